"""The component contracts (`tagmoe_lit/protocols.py`) are enough: each swappable component is
implemented here, outside the kit, plugged in by `class_path` alone, and a short fit runs on it.

The implementations wrap or restate kit components only as far as the protocol asks, so a test
fails when the module starts to call something the protocol does not list.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import BASE, smoke_args
from tagmoe_lit.backbone import PixelCodec, QwenImageBackbone
from tagmoe_lit.cli import TagMoECLI
from tagmoe_lit.protocols import Backbone, Codec, Head, TagEmbedder, TextEncoder

TINY = ["--model.backbone.init_args.num_layers", "2", "--model.backbone.init_args.num_attention_heads", "2",
        "--model.backbone.init_args.attention_head_dim", "16", "--model.backbone.init_args.axes_dims_rope", "[4, 6, 6]"]


class HalfScaleCodec(nn.Module):
    """Pixels in [0, 1] as tokens in [−0.5, 0.5], 4×4 patches: a codec the kit does not ship."""

    def __init__(self):
        super().__init__()
        self.inner = PixelCodec(patch=4)
        self.channels, self.patch, self.downsample = 3, 4, 4

    @property
    def token_channels(self) -> int:
        return 48

    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        return self.inner.encode(images_B3HW) / 2

    def decode(self, tokens_BTP: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.inner.decode(tokens_BTP * 2, h, w)


class HashTextEncoder(nn.Module):
    """Each word → a fixed random vector: no network, so nothing to quantize (`frozen_model` is None)."""

    def __init__(self, dim: int = 24):
        super().__init__()
        self.dim = dim

    def frozen_model(self) -> nn.Module | None:
        return None

    def forward(self, instructions: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        words = [t.split() or [""] for t in instructions]
        L = max(len(w) for w in words)
        out, mask = torch.zeros(len(words), L, self.dim), torch.zeros(len(words), L, dtype=torch.bool)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                out[i, j] = torch.randn(self.dim, generator=torch.Generator().manual_seed(hash(w) % 2**31))
                mask[i, j] = True
        return out.to(device), mask.to(device)


class WrappedBackbone(nn.Module):
    """A backbone that is not `QwenImageBackbone` (it holds one): only the protocol's members are public."""

    def __init__(self, token_channels: int, patch: int, out_channels: int, text_dim: int, **options):
        super().__init__()
        self.inner = QwenImageBackbone(token_channels, patch, out_channels, text_dim, **options)
        self.moe_layers = self.inner.moe_layers
        self.pretrained_path, self.upcycling, self.zero_cond_t = None, self.inner.upcycling, self.inner.zero_cond_t

    @property
    def blocks(self) -> nn.ModuleList:
        return self.inner.blocks

    def dead_ends(self) -> list[nn.Module]:
        return self.inner.dead_ends()

    def rebuild_rope(self) -> bool:
        return self.inner.rebuild_rope()

    def forward(self, noisy_BTP, reference_BRP, grid_hw, text_BLD, text_mask_BL, sigma_B, context_BC=None):
        return self.inner(noisy_BTP, reference_BRP, grid_hw, text_BLD, text_mask_BL, sigma_B, context_BC)


class OneHotTagEmbedder(nn.Module):
    """s = the multi-hot tag vector through one linear map (no per-tag table)."""

    def __init__(self, num_tags: int, dim: int = 16):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(num_tags, dim, bias=False)

    def forward(self, tags_BV: torch.Tensor) -> torch.Tensor:
        return self.proj(tags_BV)


class LinearHead(nn.Module):
    """H(g) = one linear map."""

    def __init__(self, num_experts: int, tag_dim: int):
        super().__init__()
        self.proj = nn.Linear(num_experts, tag_dim)

    def forward(self, g_BE: torch.Tensor) -> torch.Tensor:
        return self.proj(g_BE)


CASES = {  # component → (CLI arguments plugging in this file's implementation, the protocol, the attribute)
    "codec": (["--model.codec", "test_protocols.HalfScaleCodec"], Codec, "codec"),
    "text_encoder": (["--model.text_encoder", "test_protocols.HashTextEncoder"], TextEncoder, "text_encoder"),
    "backbone": (["--model.backbone", "test_protocols.WrappedBackbone"], Backbone, "backbone"),
    "tag_embedder": (["--model.tag_embedder", "test_protocols.OneHotTagEmbedder"], TagEmbedder, "tag_embedder"),
    "head": (["--model.head", "test_protocols.LinearHead"], Head, "head"),
}


@pytest.mark.parametrize("component", list(CASES))
def test_a_user_component_works_by_class_path_alone(component, tmp_path):
    args, protocol, attribute = CASES[component]
    cli = TagMoECLI(args=["fit", "--config", str(BASE), *smoke_args(tmp_path), *args, *TINY,
                          "--trainer.callbacks", "[]", "--trainer.logger", "false"])
    part = getattr(cli.model, attribute)
    assert type(part).__module__ == "test_protocols" and isinstance(part, protocol)
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    images, signature_LBE = cli.model.generate(next(iter(cli.datamodule.val_dataloader())), sampler=cli.model.sampler)
    assert images.shape[1] == 3 and signature_LBE.shape[0] == len(cli.model.moe_layers) == 2
