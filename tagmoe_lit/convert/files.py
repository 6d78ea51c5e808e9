"""Weight files: reading the release, and the kit's TAG-MoE transformer directory (write and load).

A TAG-MoE transformer directory (written by `convert official` and `convert export`) is a diffusers
`save_pretrained` folder plus one file:

    config.json                                   diffusers' transformer config (when known)
    diffusion_pytorch_model.safetensors           weights, or shards `…-00001-of-0000n.safetensors`
    diffusion_pytorch_model.safetensors.index.json  with diffusers' / HF's index `weight_map`
    tagmoe_config.json                            layout, MoE shape, schema: what a loader checks

In the `kit` layout the weights are a `TagMoEModule`'s state dict with `backbone.transformer.`
removed from the transformer's keys: dense keys are diffusers' own (so diffusers'
`from_pretrained` loads every dense part and names the MoE FFNs as unused / newly initialized),
MoE FFNs use the kit's names (`img_mlp.router.gate.weight`, `img_mlp.experts.w1_EDH`, …), and the
tag embedder and head keep their `tag_embedder.` / `head.` prefixes. In the `official` layout they
are the release's names (`official.py`), which the release's own loader reads. Directories are
built in a temporary sibling folder and moved into place: an error leaves nothing half-written.

`pretrained_tensors` gives a built module its full weights from either such a directory or a plain
(dense) diffusers Qwen-Image transformer, whose MoE experts it upcycles from the FFNs as the
backbone's own `pretrained_path` build does; `TagMoEModule.init_weights` loads them, also sharded.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from tagmoe_lit.moe import MoELayer, StackedExperts, upcycle_

if TYPE_CHECKING:
    from tagmoe_lit.module import TagMoEModule

WEIGHTS = "diffusion_pytorch_model"
TAGMOE_CONFIG = "tagmoe_config.json"
FORMAT = "tagmoe_lit.transformer/1"
TRANSFORMER_PREFIX = "backbone.transformer."
COMPONENTS = ("backbone", "tag_embedder", "head")  # TagMoEModule attributes a directory may hold
# facts a directory and a model must share (the schema is compared when both have a tag embedder)
IDENTITY = ("num_layers", "moe_blocks", "num_experts", "top_k", "router", "expert_bias", "renormalize")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
FFN_KEYS = ("net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias")  # diffusers' FeedForward (img_mlp)


# -- reading ---------------------------------------------------------------------------------
def read_safetensors_index(index: Path) -> dict[str, torch.Tensor]:
    """All tensors of an index json's shards (each shard named once, all present)."""
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names shards that are not in {index.parent}: {', '.join(missing)}.")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(index.parent / shard))
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise ValueError(f"{index} maps {len(absent)} keys to shards that do not hold them, e.g. {', '.join(absent[:5])}.")
    return tensors


def read_torch(path: Path) -> dict[str, torch.Tensor]:
    """A .pt/.bin/.ckpt state dict, loaded with `weights_only=True` (no code runs), unwrapped as the release does."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors have many types; the message names the cause
        raise ValueError(f"{path} cannot be loaded with torch.load(weights_only=True): {e}") from e
    for key in ("model", "state_dict", "transformer"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return obj


def find_weights(src: str | Path) -> Path:
    """The weight file or index under `src` (a file, a folder, or a folder with `transformer/`)."""
    src = Path(src)
    if src.is_file():
        return src
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist.")
    for folder in (src, src / "transformer"):
        for pattern in ("*.safetensors.index.json", "*.safetensors", *(f"*{s}" for s in TORCH_SUFFIXES)):
            found = sorted(folder.glob(pattern))
            if len(found) == 1:
                return found[0]
            if found:
                raise ValueError(f"{folder} holds several weight files ({', '.join(p.name for p in found)}) and no index json; pass one file as --src.")
    raise FileNotFoundError(f"No weights in {src} or {src / 'transformer'}: expected *.safetensors (with an index json if sharded) or a .pt/.bin file.")


def read_state_dict(src: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors (single or sharded with an index json) or a torch file."""
    path = find_weights(src)
    if path.name.endswith(".index.json"):
        return read_safetensors_index(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix in TORCH_SUFFIXES:
        return read_torch(path)
    raise ValueError(f"{path} is neither safetensors (or its index json) nor a torch file ({', '.join(TORCH_SUFFIXES)}).")


# -- writing ---------------------------------------------------------------------------------
@contextmanager
def staged_dir(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dst`; on success it replaces `dst`, on error it is removed."""
    dst = Path(dst)
    if dst.exists() and not overwrite and (dst.is_file() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not empty; choose another --dst or pass --overwrite.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split in key order into groups of at most `max_bytes` (a larger tensor gets its own shard)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


def write_safetensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """Write `WEIGHTS.safetensors`, or shards and their index json as diffusers does; return the file names."""
    tensors = {k: t.detach().contiguous() for k, t in tensors.items()}
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, folder / f"{WEIGHTS}.safetensors", metadata={"format": "pt"})
        return [f"{WEIGHTS}.safetensors"]
    names = [f"{WEIGHTS}-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, folder / name, metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
    }
    (folder / f"{WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return [*names, f"{WEIGHTS}.safetensors.index.json"]


def save_transformer_dir(
    dst: str | Path,
    tensors: dict[str, torch.Tensor],
    tagmoe_config: dict[str, Any],
    diffusers_config: str | None = None,
    max_shard_bytes: int = 10 * 2**30,
    overwrite: bool = False,
) -> list[str]:
    """Write a TAG-MoE transformer directory atomically; return its file names."""
    with staged_dir(dst, overwrite) as tmp:
        files = write_safetensors(tmp, tensors, max_shard_bytes)
        (tmp / TAGMOE_CONFIG).write_text(json.dumps({"format": FORMAT, **tagmoe_config}, indent=2), encoding="utf-8")
        files.append(TAGMOE_CONFIG)
        if diffusers_config is not None:
            (tmp / "config.json").write_text(diffusers_config, encoding="utf-8")
            files.append("config.json")
    return files


# -- loading ---------------------------------------------------------------------------------
def describe(module: "TagMoEModule") -> dict[str, Any]:
    """A built module's `tagmoe_config.json` facts: what a directory must share to load into it."""
    blocks = module.backbone.blocks
    layers = module.moe_layers
    first = layers[0] if layers else None
    router = type(first.router) if first else None
    return {
        "layout": "kit",
        "num_layers": len(blocks),
        "moe_blocks": [i for i, b in enumerate(blocks) if isinstance(b.img_mlp, MoELayer)],
        "num_experts": module.num_experts,
        "top_k": first.top_k if first else None,
        "router": f"{router.__module__}.{router.__qualname__}" if first else None,
        "expert_bias": first.experts.b1_EH is not None if first else None,
        "renormalize": first.renormalize if first else None,
        "schema": module.schema.name,
        "schema_fingerprint": module.schema.fingerprint,
        "num_tags": module.schema.num_tags,
        "components": [c for c in COMPONENTS if getattr(module, c) is not None],
    }


def import_class(dotted: str) -> type:
    """`package.module.Class` → the class."""
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def read_transformer_dir(src: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, tagmoe_config) of a TAG-MoE transformer directory."""
    src = Path(src)
    cfg_path = src / TAGMOE_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{src} has no {TAGMOE_CONFIG}: it was not written by `python -m tagmoe_lit convert`.")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} has format {config.get('format')!r}; this kit reads {FORMAT!r}.")
    return read_state_dict(src), config


def _listing(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def key_problems(what: str, have: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and wrongly shaped keys of `have` against `want`, one line per kind."""
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = sorted(f"{k} {list(have[k].shape)} vs model {list(want[k].shape)}" for k in set(have) & set(want) if have[k].shape != want[k].shape)
    return [
        f"{what}: {label} {_listing(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
        if keys
    ]


def kit_tensors(module: TagMoEModule) -> dict[str, torch.Tensor]:
    """The module's backbone, tag embedder and head weights, transformer keys without `backbone.transformer.`."""
    out = {}
    for key, t in module.state_dict().items():
        component = key.split(".", 1)[0]
        if component not in COMPONENTS:
            continue  # frozen text encoder / codec: built from the config, not part of the transformer
        if component == "backbone" and not key.startswith(TRANSFORMER_PREFIX):
            raise ValueError(f"Backbone key {key} is outside its transformer; export supports QwenImageBackbone.")
        out[key.removeprefix(TRANSFORMER_PREFIX)] = t
    return out


def _kit_to_module_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `kit_tensors`' renaming."""
    other = ("tag_embedder.", "head.")
    return {k if k.startswith(other) else TRANSFORMER_PREFIX + k: t for k, t in tensors.items()}


def transformer_dir_tensors(
    module: "TagMoEModule", src: str | Path, want: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A kit-layout directory's weights under the module's keys, every key checked; and the components left as built.

    `want` holds the module's full keys and shapes (default: its `state_dict()`; a sharded or
    meta-built module passes the shapes it was built with). See `load_transformer_dir`.
    """
    from tagmoe_lit.module import CheckpointMismatchError  # lazily: the module pulls in Lightning

    tensors, config = read_transformer_dir(src)
    if config.get("layout") != "kit":
        raise ValueError(f"{src} is in the {config.get('layout')!r} layout; convert it with `convert official` first.")
    module.configure_model()
    want = module.state_dict() if want is None else want
    mine = describe(module)
    problems = [f"{k}: directory {config.get(k)!r} vs model {mine[k]!r}" for k in IDENTITY if config.get(k) != mine[k]]
    if "tag_embedder" in config["components"] and module.tag_embedder is not None and config.get("schema_fingerprint") != mine["schema_fingerprint"]:
        problems.append(f"schema: directory {config.get('schema')!r} vs model {mine['schema']!r} (different tag vocabularies)")
    by_component = {c: {} for c in COMPONENTS}
    for key, t in _kit_to_module_keys(tensors).items():
        by_component[key.split(".", 1)[0]][key] = t
    for c in config["components"]:
        if getattr(module, c) is None:
            problems.append(f"{c}: the directory holds one but the model has none (set model.{c} in the config)")
            continue
        problems += key_problems(c, by_component[c], {k: v for k, v in want.items() if k.startswith(c + ".")})
    if problems:
        raise CheckpointMismatchError(f"{src} does not fit this model: " + "; ".join(problems) + "; build the model with a matching config.")
    left = [c for c in COMPONENTS if c not in config["components"] and getattr(module, c) is not None]
    return {k: t for c in config["components"] for k, t in by_component[c].items()}, left


def load_transformer_dir(module: "TagMoEModule", src: str | Path) -> list[str]:
    """Load a kit-layout directory into a built `TagMoEModule`, every key checked; return components left as built.

    The MoE shape, router, expert bias and (with a tag embedder on both sides) schema must match,
    and every component the directory holds must match the module key for key and shape for shape.
    A module component the directory lacks (the release may ship no tag embedding or head) keeps
    its initialization and is named in the result.
    """
    module.configure_model()  # build first: an unbuilt module has no parameters to inspect
    if any(t.is_meta for t in module.parameters()):  # load_state_dict into meta tensors silently does nothing
        raise ValueError("load_transformer_dir needs a module with real weights but it is on the meta device; build it "
                         "with meta_init: false (or materialize it) first.")
    tensors, left = transformer_dir_tensors(module, src)
    module.load_state_dict(tensors, strict=False)
    return left


@torch.no_grad()
def _upcycled(experts: StackedExperts, ffn_state: dict[str, torch.Tensor], noise: float, reinit: float,
              generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`upcycle_` on CPU: new experts of `experts`' shape and dtype from one FFN's tensors (used in place)."""
    from diffusers.models.attention import FeedForward

    with torch.device("meta"):
        ffn = FeedForward(experts.dim, dim_out=experts.dim, inner_dim=experts.hidden, activation_fn="gelu-approximate")
        fresh = StackedExperts(experts.num_experts, experts.dim, experts.hidden, bias=experts.b1_EH is not None)
    ffn.load_state_dict(ffn_state, assign=True)
    fresh.to_empty(device="cpu").to(experts.w1_EDH.dtype)
    upcycle_(fresh, ffn, noise, reinit, generator)
    return fresh.state_dict()


def dense_transformer_tensors(
    module: "TagMoEModule",
    src: str | Path,
    want: dict[str, torch.Tensor],
    upcycle_noise: float = 0.0,
    upcycle_reinit: float = 0.0,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A dense diffusers Qwen-Image transformer's weights under the module's keys, every key checked; and the parts left as built.

    `src` is the release's root or its `transformer/` (`find_weights`); `want` holds the module's full
    keys and shapes. The MoE blocks' experts are upcycled from their dense `img_mlp` as the backbone's
    `pretrained_path` build does (`install_moe`: one generator seeded by `seed`, block by block);
    the routers, the tag embedder and the head keep the model's initialization.
    """
    from tagmoe_lit.module import CheckpointMismatchError  # lazily: the module pulls in Lightning

    tensors = read_state_dict(src)
    moe = {i: b.img_mlp.experts for i, b in enumerate(module.backbone.blocks) if isinstance(b.img_mlp, MoELayer)}
    ffns = {i: f"transformer_blocks.{i}.img_mlp." for i in moe}
    expected = {k.removeprefix(TRANSFORMER_PREFIX): t for k, t in want.items()
                if k.startswith("backbone.") and not k.startswith(tuple(TRANSFORMER_PREFIX + f for f in ffns.values()))}
    for i, experts in moe.items():
        D, H = experts.dim, experts.hidden
        shapes = dict(zip(FFN_KEYS, ((H, D), (H,), (D, H), (D,))))
        expected.update({ffns[i] + k: torch.empty(shape, device="meta") for k, shape in shapes.items()})
    problems = key_problems("transformer", tensors, expected)
    if problems:
        raise CheckpointMismatchError(
            f"{src} does not fit this model's backbone: " + "; ".join(problems) + "; point model.init_weights at the "
            "Qwen-Image release the backbone's sizes come from, or at a `convert official` / `convert export` directory."
        )
    out = {TRANSFORMER_PREFIX + k: t for k, t in tensors.items() if not k.startswith(tuple(ffns.values()))}
    generator = torch.Generator().manual_seed(seed)
    for i, experts in moe.items():  # block order, as install_moe draws
        ffn_state = {k: tensors[ffns[i] + k] for k in FFN_KEYS}
        upcycled = _upcycled(experts, ffn_state, upcycle_noise, upcycle_reinit, generator)
        out.update({f"{TRANSFORMER_PREFIX}{ffns[i]}experts.{k}": t for k, t in upcycled.items()})
    left = ["routers"] if moe else []
    return out, left + [c for c in ("tag_embedder", "head") if getattr(module, c) is not None]


def pretrained_tensors(
    module: "TagMoEModule", src: str | Path, want: dict[str, torch.Tensor], **upcycle: float | int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Full weights for a built module from a kit directory (`tagmoe_config.json`) or a dense diffusers
    Qwen-Image transformer (`upcycle`: `dense_transformer_tensors`' options), checked against `want`."""
    if (Path(src) / TAGMOE_CONFIG).is_file():
        return transformer_dir_tensors(module, src, want)
    return dense_transformer_tensors(module, src, want, **upcycle)


def transformer_from_dir(src: str | Path) -> torch.nn.Module:
    """A diffusers `QwenImageTransformer2DModel` with the kit's MoE layers, from a kit-layout directory with a config.json.

    For diffusers pipelines: the transformer is built from `config.json`, the directory's MoE
    layers are installed as `MoELayer`s, and every transformer key is loaded strictly.
    """
    from diffusers import QwenImageTransformer2DModel

    from tagmoe_lit.backbone.surgery import install_moe

    src = Path(src)
    tensors, config = read_transformer_dir(src)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json (diffusers' transformer config); export it with `convert export`.")
    if config.get("layout") != "kit":
        raise ValueError(f"{src} is in the {config.get('layout')!r} layout; transformer_from_dir reads the kit layout.")
    transformer = QwenImageTransformer2DModel.from_config(QwenImageTransformer2DModel.load_config(src))
    blocks, moe_blocks = transformer.transformer_blocks, config["moe_blocks"]
    if moe_blocks != list(range(len(blocks) - len(moe_blocks), len(blocks))):
        raise ValueError(f"MoE blocks {moe_blocks} are not the last blocks of {len(blocks)}; the kit installs MoE in a suffix of blocks.")
    if moe_blocks:
        make = partial(
            MoELayer, num_experts=config["num_experts"], top_k=config["top_k"], router=import_class(config["router"]),
            expert_bias=config["expert_bias"], renormalize=config["renormalize"],
        )
        install_moe(blocks, len(moe_blocks), make)
    weights = {k: t for k, t in tensors.items() if not k.startswith(("tag_embedder.", "head."))}
    problems = key_problems("transformer", weights, transformer.state_dict())
    if problems:
        raise ValueError(f"{src} does not fit its own config.json: " + "; ".join(problems) + ".")
    transformer.load_state_dict(weights)
    return transformer
