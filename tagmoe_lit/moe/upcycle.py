"""Sparse upcycling: initialise every expert from the dense FFN it replaces.

Reads the diffusers `FeedForward` layout of Qwen-Image's `img_mlp`: `net[0].proj` (D → 4D, GELU tanh)
and `net[2]` (4D → D). Copies are transposed into the stacked `[E, D, H]` / `[E, H, D]` layout;
optional relative Gaussian noise breaks the symmetry between experts.
"""

from __future__ import annotations

import torch
from torch import nn

from tagmoe_lit.moe.experts import StackedExperts


@torch.no_grad()
def upcycle_(experts: StackedExperts, ffn: nn.Module, noise_std: float = 0.0, generator: torch.Generator | None = None) -> None:
    """Copy a dense FFN into each expert in place; `noise_std` is relative to each matrix's std."""
    fc1, fc2 = ffn.net[0].proj, ffn.net[2]
    if (fc1.in_features, fc1.out_features) != (experts.dim, experts.hidden):
        raise ValueError(
            f"Cannot upcycle an FFN of shape {fc1.in_features}→{fc1.out_features} into experts of "
            f"shape {experts.dim}→{experts.hidden}."
        )
    pairs = [(experts.w1_EDH, fc1.weight.T), (experts.w2_EHD, fc2.weight.T)]
    if experts.b1_EH is not None:
        pairs += [(experts.b1_EH, fc1.bias), (experts.b2_ED, fc2.bias)]
    for stacked, dense in pairs:
        stacked.copy_(dense.to(stacked.dtype).expand_as(stacked))
        if noise_std > 0 and dense.dim() == 2:
            noise = torch.randn(stacked.shape, generator=generator).to(stacked)  # CPU draw: same on any device
            stacked.add_(noise * noise_std * dense.std())
