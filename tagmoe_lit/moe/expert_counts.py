"""`ExpertCounts`: the one owner of an MoE layer's token counts between optimizer steps.

Two consumers need counts summed over every micro-batch of an optimizer step: the load-balancing
loss (f over the global batch, DESIGN.md pitfall 5) and aux-free bias routers (one update per
optimizer step). This object holds them and offers the only operations on them:

    add(counts_E)      the layer, after each *training* forward (never in eval);
    step_total()       the layer, for the balance loss of the current micro-batch;
    reset_parameters() at the start of fit and after each optimizer step (also the meta-init);
    end_step(layers)   once per optimizer step: all-reduce, hand the global counts to bias
                       routers, reset (the caller is the training loop's pre-optimizer hook).

Activation checkpointing re-runs a block's forward inside backward (DESIGN.md pitfall 8). A
forward that runs while autograd is executing a backward pass is such a recompute, so `add`
ignores it: counting is right at its depth, for any training loop (Lightning or a plain diffusers
loop with `enable_gradient_checkpointing()`), with no undo step elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from tagmoe_lit.moe.layer import MoELayer


def in_backward() -> bool:
    """True while autograd's engine runs a backward pass (where checkpointing recomputes forwards).

    torch has no public API for this; the private call is tested (eager, and diffusers' and FSDP2's
    checkpointing). A `torch.compile`d block would fix its value at trace time: count outside it."""
    return torch._C._current_graph_task_id() != -1


def global_counts(counts_LE: torch.Tensor) -> torch.Tensor:
    """Sum per-layer expert counts over all data-parallel ranks (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        counts_LE = counts_LE.clone()
        dist.all_reduce(counts_LE)
    return counts_LE


@runtime_checkable
class BiasBalanced(Protocol):
    """A router that balances by a selection bias updated from each optimizer step's global counts."""

    def selection_bias(self) -> torch.Tensor: ...

    def update_bias(self, counts_E: torch.Tensor) -> None: ...


class ExpertCounts(nn.Module):
    """Top-k assignments per expert since the last optimizer step, on this rank (a non-saved buffer)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.register_buffer("pending_E", torch.zeros(num_experts), persistent=False)

    @torch.no_grad()
    def add(self, counts_E: torch.Tensor) -> None:
        """Count one training forward's assignments; a checkpoint recompute is not counted again."""
        if not in_backward():
            self.pending_E += counts_E

    def step_total(self) -> torch.Tensor:
        """This rank's counts of the optimizer step so far (a copy)."""
        return self.pending_E.clone()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero the counts (the constructor's state; also what meta-device materialization re-runs)."""
        self.pending_E.zero_()


def reset_counts(layers: Sequence[MoELayer]) -> None:
    """Drop every layer's pending counts (a fit interrupted mid-step would leave its counts behind)."""
    for layer in layers:
        layer.counts.reset_parameters()


def end_step(layers: Sequence[MoELayer]) -> None:
    """Once per optimizer step: one all-reduce of every layer's counts, bias updates, reset."""
    if not layers:
        return
    counts_LE = global_counts(torch.stack([layer.counts.pending_E for layer in layers]))
    for layer, counts_E in zip(layers, counts_LE):
        if isinstance(layer.router, BiasBalanced):
            layer.router.update_bias(counts_E)
        layer.counts.reset_parameters()
