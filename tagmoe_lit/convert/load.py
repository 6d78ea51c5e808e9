"""Loading weights into a built model: a TAG-MoE transformer directory, or a dense diffusers release.

`pretrained_tensors` gives a built module its full weights from either a kit-layout directory
(`files.py`; every key and the model identity checked) or a plain (dense) diffusers Qwen-Image
transformer, whose MoE experts it upcycles from the FFNs as the backbone's own `pretrained_path`
build does; `model.init_weights` loads them, also sharded (`distributed/weights.py`).
`transformer.py` loads a directory as a diffusers model of its own (`TagMoEQwenImageTransformer2DModel`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tagmoe_lit.convert.files import (
    FFN_KEYS,
    IDENTITY,
    LATER_IDENTITY,
    TAGMOE_CONFIG,
    TRANSFORMER_PREFIX,
    key_problems,
    read_state_dict,
    read_transformer_dir,
)
from tagmoe_lit.identity import COMPONENTS, CheckpointMismatchError, model_identity
from tagmoe_lit.moe import MoELayer, StackedExperts
from tagmoe_lit.moe.upcycle import Upcycling, upcycled_on_cpu

if TYPE_CHECKING:
    from tagmoe_lit.module import TagMoEModule


def import_class(dotted: str) -> type:
    """`package.module.Class` → the class."""
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


_HINTS = {"zero_cond_t": " (set model.backbone.init_args.zero_cond_t as the directory says)"}


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
    tensors, config = read_transformer_dir(src)
    if config.get("layout") != "kit":
        raise ValueError(f"{src} is in the {config.get('layout')!r} layout; convert it with `convert official` first.")
    module.configure_model()
    want = module.state_dict() if want is None else want
    mine = model_identity(module)
    problems = [f"{k}: directory {config.get(k)!r} vs model {mine[k]!r}{_HINTS.get(k, '')}" for k in IDENTITY
                if config.get(k) != mine[k] and (k in config or k not in LATER_IDENTITY)]
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


def _upcycled(experts: StackedExperts, ffn_state: dict[str, torch.Tensor], noise: float, reinit: float,
              generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`upcycle_` on CPU: new experts of `experts`' shape and dtype from one FFN's tensors (used in place)."""
    from diffusers.models.attention import FeedForward

    with torch.device("meta"):
        ffn = FeedForward(experts.dim, dim_out=experts.dim, inner_dim=experts.hidden, activation_fn="gelu-approximate")
    ffn.load_state_dict(ffn_state, assign=True)
    return upcycled_on_cpu(experts, ffn, noise, reinit, generator).state_dict()


def dense_transformer_tensors(
    module: "TagMoEModule",
    src: str | Path,
    want: dict[str, torch.Tensor],
    upcycling: Upcycling = Upcycling(),
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A dense diffusers Qwen-Image transformer's weights under the module's keys, every key checked; and the parts left as built.

    `src` is the release's root or its `transformer/` (`find_weights`); `want` holds the module's full
    keys and shapes. The MoE blocks' experts are upcycled from their dense `img_mlp` as the backbone's
    `pretrained_path` build does (`install_moe`: one generator seeded by `upcycling.seed`, block by block);
    the routers, the tag embedder and the head keep the model's initialization.
    """
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
    generator = torch.Generator().manual_seed(upcycling.seed)
    for i, experts in moe.items():  # block order, as install_moe draws
        ffn_state = {k: tensors[ffns[i] + k] for k in FFN_KEYS}
        upcycled = _upcycled(experts, ffn_state, upcycling.noise, upcycling.reinit, generator)
        out.update({f"{TRANSFORMER_PREFIX}{ffns[i]}experts.{k}": t for k, t in upcycled.items()})
    left = ["routers"] if moe else []
    return out, left + [c for c in ("tag_embedder", "head") if getattr(module, c) is not None]


def pretrained_tensors(
    module: "TagMoEModule", src: str | Path, want: dict[str, torch.Tensor], upcycling: Upcycling = Upcycling()
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Full weights for a built module from a kit directory (`tagmoe_config.json`) or a dense diffusers
    Qwen-Image transformer (its experts upcycled as `upcycling` says), checked against `want`."""
    if (Path(src) / TAGMOE_CONFIG).is_file():
        return transformer_dir_tensors(module, src, want)
    return dense_transformer_tensors(module, src, want, upcycling)
