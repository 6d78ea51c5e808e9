"""`convert export`: a kit checkpoint → a TAG-MoE transformer directory (diffusers `save_pretrained` style).

The checkpoint is a Lightning `.ckpt` from `fit` (read with `weights_only=True`, its `tagmoe`
record checked as `--ckpt_path` resume does) or a directory from `convert official`; the model it
loads into is built from the same config. The `kit` layout holds any kit model (`files.py`); the
`official` layout writes the release's dMoE names so the release's own pipeline can load the
weights, which needs top-1 routing with a `LinearRouter`, bias-free experts, and the release's
tag embedding and head (`official.to_official` names what stands in the way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from tagmoe_lit.convert.files import TAGMOE_CONFIG, key_problems, kit_tensors, save_transformer_dir
from tagmoe_lit.convert.load import load_transformer_dir
from tagmoe_lit.convert.official import to_official
from tagmoe_lit.convert.transformer import class_files
from tagmoe_lit.identity import CheckpointMismatchError, model_identity
from tagmoe_lit.lora import merge_lora_, save_adapter
from tagmoe_lit.module import TagMoEModule

Layout = Literal["kit", "official"]


def load_checkpoint(module: TagMoEModule, ckpt_path: str | Path) -> list[str]:
    """Load a `.ckpt` or a TAG-MoE transformer directory into `module`, every key checked.

    Returns the module components the checkpoint did not hold (they keep their initialization).
    """
    path = Path(ckpt_path)
    module.meta_init = False  # a training config may build on meta for sharding; loading needs real tensors
    module.configure_model()
    if path.is_dir():
        if not (path / TAGMOE_CONFIG).is_file():
            raise FileNotFoundError(
                f"{path} is a folder without {TAGMOE_CONFIG}: pass a Lightning .ckpt, a `convert official` output, "
                "or consolidate a distributed (ModelParallelStrategy) checkpoint into one .ckpt first."
            )
        return load_transformer_dir(module, path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} has no 'state_dict': it is not a Lightning checkpoint.")
    module.on_load_checkpoint(ckpt)  # schema and MoE shape, as on resume
    problems = key_problems("checkpoint", ckpt["state_dict"], module.state_dict())
    if problems:
        raise CheckpointMismatchError(f"{path} does not fit this model: " + "; ".join(problems) + ".")
    module.load_state_dict(ckpt["state_dict"])
    return []


def export(
    module: TagMoEModule,
    dst: str | Path,
    layout: Layout = "kit",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 10 * 2**30,
    overwrite: bool = False,
) -> list[str]:
    """Write the module's transformer (with tag embedder and head) as a TAG-MoE transformer directory.

    Args:
        layout: `kit` (any kit model) or `official` (the release's dMoE key names).
        dtype: cast floating-point weights (e.g. bf16 halves a full Qwen-Image); None keeps them.
        max_shard_bytes: larger weights are split into safetensors shards with an index json.
    Returns the written file names.
    """
    if module.lora is not None:
        raise ValueError("This model has LoRA adapters, which a transformer directory does not hold; export with "
                         "--merge_lora (adapters folded into the weights) or --adapter_only (peft's format).")
    config = model_identity(module)
    tensors = kit_tensors(module)
    if dtype is not None:
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    if layout == "official":
        if config["num_experts"] == 0 or config["top_k"] != 1:
            raise ValueError(
                f"The official layout holds a top-1 MoE, but this model has num_experts={config['num_experts']}, "
                f"top_k={config['top_k']}; export with --layout kit."
            )
        tensors = to_official(tensors)
    config["layout"] = layout
    texts = class_files(dict(module.backbone.transformer.config), config)
    return save_transformer_dir(dst, tensors, config, texts, max_shard_bytes, overwrite)


def merge_lora(module: TagMoEModule) -> None:
    """Fold a LoRA model's adapters into its weights: it becomes the plain model it computes."""
    if module.lora is None:
        raise ValueError("--merge_lora: this model has no LoRA adapters (model.lora is null); drop the flag.")
    merge_lora_(module.backbone)
    module.lora = None


def export_adapter(module: TagMoEModule, dst: str | Path, overwrite: bool = False) -> list[str]:
    """Write a LoRA model's adapters only (peft's format, `lora.save_adapter`)."""
    if module.lora is None:
        raise ValueError("--adapter_only: this model has no LoRA adapters (model.lora is null); export the whole model instead.")
    dst = Path(dst)
    if dst.exists() and not overwrite and (dst.is_file() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not empty; choose another --dst or pass --overwrite.")
    return save_adapter(module.backbone.transformer, module.lora, dst)
