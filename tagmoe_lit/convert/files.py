"""Weight files: reading the release, and the kit's TAG-MoE transformer directory (write and read).

A TAG-MoE transformer directory (written by `convert official` and `convert export`) is a diffusers
`save_pretrained` folder plus one file:

    tagmoe_transformer.json                       `TagMoEQwenImageTransformer2DModel`'s config (when the sizes are known)
    README.md                                     which class loads it
    diffusion_pytorch_model.safetensors           weights, or shards `…-00001-of-0000n.safetensors`
    diffusion_pytorch_model.safetensors.index.json  with diffusers' / HF's index `weight_map`
    tagmoe_config.json                            layout, MoE shape, schema: what a loader checks

In the `kit` layout the weights are a `TagMoEModule`'s state dict with `backbone.transformer.`
removed from the transformer's keys: dense keys are diffusers' own, MoE FFNs use the kit's names (`img_mlp.router.gate.weight`, `img_mlp.experts.w1_EDH`, …), and the
tag embedder and head keep their `tag_embedder.` / `head.` prefixes; diffusers loads it as
`TagMoEQwenImageTransformer2DModel` (`transformer.py`), and its dense class, finding no
`config.json`, refuses it. In the `official` layout they are the release's names (`official.py`),
which the release's own loader reads. Directories are
built in a temporary sibling folder and moved into place: an error leaves nothing half-written.

Loading such a directory (or a dense diffusers release) into a model is `load.py`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from tagmoe_lit.identity import COMPONENTS

if TYPE_CHECKING:
    from tagmoe_lit.module import TagMoEModule

WEIGHTS = "diffusion_pytorch_model"
TAGMOE_CONFIG = "tagmoe_config.json"
FORMAT = "tagmoe_lit.transformer/1"
TRANSFORMER_PREFIX = "backbone.transformer."
# facts a directory and a model must share (the schema is compared when both have a tag embedder)
IDENTITY = ("num_layers", "moe_blocks", "num_experts", "top_k", "router", "expert_bias", "renormalize", "zero_cond_t")
LATER_IDENTITY = ("zero_cond_t",)  # compared when present: directories written before it was recorded lack it
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
    texts: dict[str, str] | None = None,
    max_shard_bytes: int = 10 * 2**30,
    overwrite: bool = False,
) -> list[str]:
    """Write a TAG-MoE transformer directory atomically; return its file names.

    `texts` are further files by name (`transformer.class_files`: the config diffusers loads the
    directory with, and a README)."""
    with staged_dir(dst, overwrite) as tmp:
        files = write_safetensors(tmp, tensors, max_shard_bytes)
        (tmp / TAGMOE_CONFIG).write_text(json.dumps({"format": FORMAT, **tagmoe_config}, indent=2), encoding="utf-8")
        files.append(TAGMOE_CONFIG)
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
            files.append(name)
    return files


# -- reading a TAG-MoE directory ------------------------------------------------------------
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
