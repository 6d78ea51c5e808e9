"""Routers: token features → expert logits.

The protocol a router implements (`tagmoe_lit.protocols.Router`; a user's own router in their own
module works by `class_path`):

    class MyRouter(nn.Module):
        needs_context = False                        # True: forward also gets the sample's context
        def __init__(self, dim: int, num_experts: int, **your_options): ...
        def forward(self, x_ND: Tensor) -> Tensor:   # logits_NE, any dtype
            ...

The MoE layer builds it as `router(dim, num_experts)`; YAML gives only `your_options`. The layer
runs the router in fp32 with autocast disabled (DESIGN.md pitfall 4), applies the softmax and the
top-k choice itself, so a router holds no routing policy, only the scoring function.

Two optional capabilities:
- `selection_bias() -> Tensor[E]`: added to the probabilities for the top-k *choice* only (the
  weights stay the raw probabilities), and `update_bias(counts_E)`, called once per optimizer step
  with the step's global expert counts (`AuxFreeBiasRouter`; the `BiasBalanced` protocol of
  `expert_counts.py`, whose `end_step` calls it).
- `needs_context = True`: `forward(x_ND, context_NC)` also receives per-token copies of the
  sample's context (the tag embedding s, `TagConditionedRouter`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearRouter(nn.Module):
    """One bias-free Linear(dim → E), as MegaBlocks' dMoE in the official TAG-MoE release."""

    needs_context = False

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
        LinearRouter.reset_parameters(self)  # subclasses add layers, then call their own reset

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate.weight, std=self.init_std)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.gate(x_ND)


class MLPRouter(nn.Module):
    """The paper's gate: a 2-layer MLP (Linear → GELU → Linear) scoring the experts."""

    needs_context = False

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


class NoisyTopKRouter(LinearRouter):
    """Shazeer et al.'s noisy gating: logits + ε·softplus(W_noise·x) while training, clean in eval.

    The noise comes from the global RNG so activation checkpointing's re-run (which restores that
    RNG) recomputes the same routing; exact resume therefore does not cover this router's noise.
    """

    def __init__(self, dim: int, num_experts: int, init_std: float = 0.02):
        """
        Args:
            dim: token feature size D.
            num_experts: number of experts E.
            init_std: std of the normal init of the gate and noise weights.
        """
        super().__init__(dim, num_experts, init_std)
        self.noise = nn.Linear(dim, num_experts, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.normal_(self.noise.weight, std=self.init_std)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        logits_NE = self.gate(x_ND)
        if not self.training:
            return logits_NE
        return logits_NE + torch.randn_like(logits_NE) * F.softplus(self.noise(x_ND))


class AuxFreeBiasRouter(LinearRouter):
    """DeepSeek-V3's auxiliary-loss-free balancing (arXiv 2408.15664) on top of the linear gate.

    A per-expert bias shifts the top-k choice only. After each optimizer step the module calls
    `update_bias` with the step's global counts: overloaded experts' bias falls by `update_rate`,
    underloaded ones' rises (sign rule), mean-centred. The bias is a persistent buffer, so it
    survives checkpoints and resume.
    """

    def __init__(self, dim: int, num_experts: int, update_rate: float = 1e-3, init_std: float = 0.02):
        """
        Args:
            dim: token feature size D.
            num_experts: number of experts E.
            update_rate: bias step per optimizer step (γ in the paper).
            init_std: std of the normal init of the gate weight.
        """
        super().__init__(dim, num_experts, init_std)
        self.update_rate = update_rate
        self.register_buffer("expert_bias", torch.zeros(num_experts))

    def selection_bias(self) -> torch.Tensor:
        return self.expert_bias

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor) -> None:
        step = self.update_rate * torch.sign(counts_E.float().mean() - counts_E.float())
        self.expert_bias += (step - step.mean()).to(self.expert_bias)


class TagConditionedRouter(LinearRouter):
    """Routes from token features *and* the sample's tag embedding s: an oracle / upper bound.

    It needs tags at inference, which TAG-MoE is designed not to; use it to bound what perfect
    task knowledge buys. Logits = W_x·x + W_s·s.
    """

    needs_context = True

    def __init__(self, dim: int, num_experts: int, tag_dim: int = 512, init_std: float = 0.02):
        """
        Args:
            dim: token feature size D.
            num_experts: number of experts E.
            tag_dim: size of the tag embedding s (the tag embedder's `dim`).
            init_std: std of the normal init of both weights.
        """
        super().__init__(dim, num_experts, init_std)
        self.tag_dim = tag_dim
        self.tag_gate = nn.Linear(tag_dim, num_experts, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.normal_(self.tag_gate.weight, std=self.init_std)

    def forward(self, x_ND: torch.Tensor, context_NC: torch.Tensor | None = None) -> torch.Tensor:
        if context_NC is None:
            raise ValueError(
                "TagConditionedRouter needs each sample's tags at inference (it is an oracle); give the "
                "batch `tags` and keep `model.tag_embedder`, or choose a router that infers the task."
            )
        if context_NC.shape[-1] != self.tag_dim:
            raise ValueError(f"TagConditionedRouter(tag_dim={self.tag_dim}) got tag embeddings of size {context_NC.shape[-1]}; set tag_dim to the tag embedder's dim.")
        return self.gate(x_ND) + self.tag_gate(context_NC)
