"""Routers: token features → expert logits.

The protocol a router implements (a user's own router in their own module works by `class_path`):

    class MyRouter(nn.Module):
        def __init__(self, dim: int, num_experts: int, **your_options): ...
        def forward(self, x_ND: Tensor) -> Tensor:   # logits_NE, any dtype
            ...

The MoE layer builds it as `router(dim, num_experts)`; YAML gives only `your_options`. The layer
runs the router in fp32 with autocast disabled (DESIGN.md pitfall 4), applies the softmax and the
top-k choice itself, so a router holds no routing policy, only the scoring function.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearRouter(nn.Module):
    """One bias-free Linear(dim → E), as MegaBlocks' dMoE in the official TAG-MoE release."""

    def __init__(self, dim: int, num_experts: int, init_std: float = 0.02):
        """
        Args:
            dim: token feature size D.
            num_experts: number of experts E.
            init_std: std of the normal init of the gate weight (MegaBlocks' default 0.02).
        """
        super().__init__()
        self.init_std = init_std
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate.weight, std=self.init_std)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.gate(x_ND)


class MLPRouter(nn.Module):
    """The paper's gate: a 2-layer MLP (Linear → GELU → Linear) scoring the experts."""

    def __init__(self, dim: int, num_experts: int, hidden: int = 256, init_std: float = 0.02):
        """
        Args:
            dim: token feature size D.
            num_experts: number of experts E.
            hidden: width of the gate's hidden layer.
            init_std: std of the normal init of both gate weights.
        """
        super().__init__()
        self.init_std = init_std
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (self.net[0], self.net[2]):
            nn.init.normal_(layer.weight, std=self.init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.net(x_ND)
