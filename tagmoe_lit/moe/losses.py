"""Balancing losses: load balance over the global batch, and the router z-loss.

Switch-Transformer form per layer, averaged over layers as MegaBlocks' batched loss does:

    L_lb = mean_layers  E · Σ_e f_e · P_e

with f_e the fraction of token assignments expert e received (no gradient) and P_e its mean router
probability (gradient). Counts are never summed across layers before the product (DESIGN.md
pitfall 5). f is taken over the *global* batch — counts summed over the optimizer step's
micro-batches so far and all-reduced over data-parallel ranks — so each micro-batch's P is pushed
towards the global load, not its own: per-micro-batch balancing fights task specialization.
A perfectly uniform router scores exactly 1.0.

The router z-loss (ST-MoE, arXiv 2202.08906) is the mean squared log-sum-exp of the router logits,
averaged over layers; it keeps logits small so the fp32 softmax stays well conditioned.
"""

from __future__ import annotations

import torch

from tagmoe_lit.moe.expert_counts import global_counts
from tagmoe_lit.moe.stats import RoutingStats


def load_balancing_loss(stats: RoutingStats) -> torch.Tensor:
    """E · Σ_e f_e · P_e per layer, mean over layers; 1.0 for a uniform router."""
    counts_LE = global_counts(torch.stack([layer.step_counts_E for layer in stats.layers]))
    f_LE = counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1.0)
    P_LE = torch.stack([layer.probs_mean_E for layer in stats.layers])
    return stats.num_experts * (f_LE * P_LE).sum(-1).mean()


def router_z_loss(stats: RoutingStats) -> torch.Tensor:
    """Mean over layers of mean_tokens logsumexp(logits)²."""
    return torch.stack([layer.z_loss for layer in stats.layers]).mean()
