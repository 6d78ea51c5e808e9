"""What a checkpoint or a weight directory must share with the model it loads into.

One record, `model_identity`, serves both: Lightning checkpoints store it under `tagmoe`
(`check_checkpoint`), TAG-MoE transformer directories as `tagmoe_config.json` (`convert/`). A
mismatch is a `CheckpointMismatchError` naming every differing fact, raised before any weight moves.

Checkpoints written before this record grew hold only its first five facts (schema,
schema_fingerprint, num_tags, num_experts, moe_layers); a saved record is compared on the facts it
has, and must have those five.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tagmoe_lit.module import TagMoEModule

COMPONENTS = ("backbone", "tag_embedder", "head")  # TagMoEModule attributes a weight directory may hold
CHECKPOINT_CORE = ("schema", "schema_fingerprint", "num_tags", "num_experts", "moe_layers")


class CheckpointMismatchError(ValueError):
    """A checkpoint or weight directory was written for another model: tag schema, MoE shape, router
    class, top-k, expert bias, renormalization or reference-token modulation (a router swap on resume is
    refused too)."""


def model_identity(module: TagMoEModule) -> dict[str, Any]:
    """Plain-typed facts of a built module: tag vocabulary, MoE shape and which components it has."""
    blocks = module.backbone.blocks
    layers = module.moe_layers
    first = layers[0] if layers else None
    router = type(first.router) if first else None
    moe = {id(layer) for layer in layers}
    return {
        "schema": module.schema.name,
        "schema_fingerprint": module.schema.fingerprint,
        "num_tags": module.schema.num_tags,
        "num_experts": module.num_experts,
        "moe_layers": len(layers),
        "layout": "kit",
        "num_layers": len(blocks),
        "moe_blocks": [i for i, b in enumerate(blocks) if any(id(m) in moe for m in b.modules())],
        "top_k": first.top_k if first else None,
        "router": f"{router.__module__}.{router.__qualname__}" if first else None,
        "expert_bias": first.experts.b1_EH is not None if first else None,
        "renormalize": first.renormalize if first else None,
        "zero_cond_t": module.backbone.zero_cond_t,
        "components": [c for c in COMPONENTS if getattr(module, c) is not None],
        "lora": asdict(module.lora) if module.lora is not None else None,
    }


def check_checkpoint(saved: dict[str, Any] | None, module: TagMoEModule) -> None:
    """Refuse a Lightning checkpoint's `tagmoe` record that does not describe `module`."""
    if saved is None:
        raise CheckpointMismatchError("Checkpoint has no 'tagmoe' record: it was not written by tagmoe_lit.")
    missing = [k for k in CHECKPOINT_CORE if k not in saved]
    if missing:
        raise CheckpointMismatchError(f"Checkpoint's 'tagmoe' record lacks {', '.join(missing)}: it was not written by tagmoe_lit.")
    mine = model_identity(module)
    diffs = [f"{k}: checkpoint {saved[k]!r} vs config {v!r}" for k, v in mine.items() if k in saved and saved[k] != v]
    if diffs:
        raise CheckpointMismatchError(
            "Checkpoint does not match this model (" + "; ".join(diffs) + "); load it with the config it was trained with."
        )
