"""Sparse upcycling (dense FFN → E experts) and its reverse (E experts → one FFN).

Reads and writes the diffusers `FeedForward` layout of Qwen-Image's `img_mlp`: `net[0].proj`
(D → 4D, GELU tanh) and `net[2]` (4D → D). Copies are transposed into the stacked `[E, D, H]` /
`[E, H, D]` layout. Two ways to break the symmetry between experts: relative Gaussian noise on
the copied matrices, and partial re-initialisation (a random `reinit_fraction` of each expert's
hidden units drawn fresh, as in "Scaling Laws for Upcycling"). `downcycle_` averages the experts
back into one FFN for ablations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tagmoe_lit.moe.experts import StackedExperts


@dataclass(frozen=True)
class Upcycling:
    """How a backbone turns dense FFN weights into experts (`upcycle_`'s options and its generator's seed)."""

    noise: float = 0.0  # relative Gaussian noise on the copied matrices
    reinit: float = 0.0  # share of each expert's hidden units re-initialised
    seed: int = 0  # seeds one CPU generator, consumed block by block


def _pairs(experts: StackedExperts, ffn: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(stacked expert tensor, matching dense tensor in stacked orientation) pairs."""
    fc1, fc2 = ffn.net[0].proj, ffn.net[2]
    if (fc1.in_features, fc1.out_features) != (experts.dim, experts.hidden):
        raise ValueError(
            f"FFN of shape {fc1.in_features}→{fc1.out_features} does not match experts of "
            f"shape {experts.dim}→{experts.hidden}."
        )
    pairs = [(experts.w1_EDH, fc1.weight.T), (experts.w2_EHD, fc2.weight.T)]
    if experts.b1_EH is not None:
        pairs += [(experts.b1_EH, fc1.bias), (experts.b2_ED, fc2.bias)]
    return pairs


@torch.no_grad()
def upcycle_(
    experts: StackedExperts,
    ffn: nn.Module,
    noise_std: float = 0.0,
    reinit_fraction: float = 0.0,
    generator: torch.Generator | None = None,
) -> None:
    """Copy a dense FFN into each expert in place.

    Args:
        noise_std: Gaussian noise added to each copied matrix, relative to that matrix's std.
        reinit_fraction: share of each expert's hidden units re-initialised (fresh nn.Linear init).
        generator: CPU generator for noise and re-init (the same draws on any device).
    """
    if not 0.0 <= reinit_fraction <= 1.0:
        raise ValueError(f"reinit_fraction={reinit_fraction} must be within [0, 1].")
    for stacked, dense in _pairs(experts, ffn):
        stacked.copy_(dense.to(stacked.dtype).expand_as(stacked))
        if noise_std > 0 and dense.dim() == 2:
            noise = torch.randn(stacked.shape, generator=generator).to(stacked)
            stacked.add_(noise * noise_std * dense.std())
    n_new = round(reinit_fraction * experts.hidden)
    if n_new == 0:
        return
    # the fresh units' init draws from the global RNG: seed it from `generator`, so an upcycled layer
    # is the same whenever it is built (eager, or from init_weights after a meta build) and on every rank
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        fresh = StackedExperts(experts.num_experts, experts.dim, experts.hidden, bias=experts.b1_EH is not None)
        for e in range(experts.num_experts):
            units = torch.randperm(experts.hidden, generator=generator)[:n_new]
            fresh.reset_parameters()
            experts.w1_EDH[e][:, units] = fresh.w1_EDH[e][:, units].to(experts.w1_EDH)
            experts.w2_EHD[e][units] = fresh.w2_EHD[e][units].to(experts.w2_EHD)
            if experts.b1_EH is not None:
                experts.b1_EH[e][units] = fresh.b1_EH[e][units].to(experts.b1_EH)


@torch.no_grad()
def downcycle_(ffn: nn.Module, experts: StackedExperts) -> None:
    """Write the mean of the experts into a dense FFN in place (the reverse of upcycling)."""
    for stacked, dense in _pairs(experts, ffn):
        dense.copy_(stacked.mean(0).to(dense.dtype))


@torch.no_grad()
def upcycled_on_cpu(
    experts: StackedExperts, ffn: nn.Module, noise_std: float = 0.0, reinit_fraction: float = 0.0,
    generator: torch.Generator | None = None,
) -> StackedExperts:
    """New CPU experts of `experts`' shape and dtype, upcycled from `ffn` (`upcycle_`): the full tensors
    for a sharded or not yet built layer."""
    with torch.device("meta"):
        full = StackedExperts(experts.num_experts, experts.dim, experts.hidden, bias=experts.b1_EH is not None)
    full.to_empty(device="cpu").to(experts.w1_EDH.dtype)
    upcycle_(full, ffn, noise_std, reinit_fraction, generator)
    return full


@torch.no_grad()
def reset_tied_(experts: StackedExperts) -> None:
    """From-scratch experts as the surgery starts them: one freshly initialised dense FFN (diffusers'
    `FeedForward`, drawn from the global RNG on CPU) copied into every expert through `upcycle_`.

    The meta-device path of the same init: an eager build copies the FFN it replaces, a meta build
    has none, so `MoELayer.reset_parameters` (which materialization runs) draws one. Works on FSDP2
    shards too: the full copies are made on CPU and each rank keeps its part.
    """
    from diffusers.models.attention import FeedForward

    with torch.device("cpu"):
        ffn = FeedForward(experts.dim, dim_out=experts.dim, inner_dim=experts.hidden, activation_fn="gelu-approximate")
    for name, t in upcycled_on_cpu(experts, ffn).named_parameters():
        _fill_(getattr(experts, name), t)


def _fill_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full CPU tensor into a parameter, or into this rank's shard of a DTensor parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)
