"""Prediction heads H: routing signature g (E-dim) → tag space (D-dim), compared with s."""

from __future__ import annotations

import torch
from torch import nn


class MLPHead(nn.Module):
    """The paper's head: Linear(E→256) → GELU → Linear(256→256) → GELU → Linear(256→D)."""

    def __init__(self, num_experts: int, tag_dim: int, hidden: int = 256):
        """
        Args:
            num_experts: size E of the routing signature.
            tag_dim: size D of the semantic vector s (the tag embedder's `dim`).
            hidden: width of the two hidden layers.
        """
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_experts, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, tag_dim)
        )

    def forward(self, g_BE: torch.Tensor) -> torch.Tensor:
        return self.net(g_BE)
