"""Generation: sample each batch image from its instruction and reference with the Euler sampler.

The one sampling path: `predict`, `test`'s edit scores and the sample-grid callback call
`generate`, and the one-image `edit` (`editing.py`) calls `sample`, the loop inside it. Tags reach only oracle routers (`needs_context`); TAG-MoE's routers infer the task.
`clean_estimate` is the one-step view x̂0 = x_σ − σ·v̂ (does a checkpoint read its reference?).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tagmoe_lit.flow import interpolate
from tagmoe_lit.objective import conditioning
from tagmoe_lit.sampling import FlowSampler

if TYPE_CHECKING:
    from tagmoe_lit.module import TagMoEModule


@torch.no_grad()
def generate(model: TagMoEModule, batch: dict, sampler: FlowSampler) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images [B, 3, H, W] in [0, 1] and the routing signature per MoE layer [L, B, E], averaged over
    the sampler's conditional forwards (None for a dense model).

    Each sample's starting noise is seeded by its own `index`, so an image does not depend on its
    batch-mates.
    """
    no_drop = torch.zeros(len(batch["instruction"]), dtype=torch.bool)
    instructions, reference = conditioning(batch, model.codec.encode(batch["source"]), no_drop, no_drop)
    grid = model.grid(batch["target"])
    noise = model.fixed_noise(batch, "sample")
    tokens, signatures = sample(model, instructions, reference, grid, noise, model.tag_embedding(batch), sampler)
    return model.codec.decode(tokens, *grid).clamp(0, 1), signatures


@torch.no_grad()
def sample(model: TagMoEModule, instructions: list[str], reference: torch.Tensor, grid: tuple[int, int], noise: torch.Tensor,
           s: torch.Tensor | None, sampler: FlowSampler) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampler's clean tokens [B, h·w, P] and the routing signature per MoE layer [L, B, E],
    averaged over its conditional forwards (None for a dense model); `s` reaches oracle routers only."""
    signatures: list[torch.Tensor] = []

    def velocity(x, ref, grid_hw, instr, sigma):
        pred, stats = model.velocity(x, ref, grid_hw, instr, sigma, s)
        if stats is not None and instr is instructions:  # the conditional branch
            signatures.append(torch.stack([layer.signature_BE for layer in stats.layers]))
        return pred, stats

    tokens = sampler(velocity, instructions, reference, grid, model.codec.token_channels, noise=noise)
    return tokens, torch.stack(signatures).mean(0) if signatures else None


@torch.no_grad()
def clean_estimate(model: TagMoEModule, batch: dict, sigma: float) -> torch.Tensor:
    """x̂0 = x_σ − σ·v̂ as images [B, 3, H, W] in [0, 1], from each sample's fixed "eval" noise at
    noise level `sigma`, conditioned on its instruction and reference (one forward, no sampler)."""
    x0, source = model.encode_images(batch)
    keep = torch.zeros(len(batch["instruction"]), dtype=torch.bool)
    instructions, reference = conditioning(batch, source, keep, keep)
    grid = model.grid(batch["target"])
    sigma_B = torch.full((x0.shape[0],), sigma, device=x0.device)
    x_s = interpolate(x0, model.fixed_noise(batch, "eval"), sigma_B)
    v, _ = model.velocity(x_s, reference, grid, instructions, sigma_B, model.tag_embedding(batch))
    return model.codec.decode(x_s - sigma * v, *grid).clamp(0, 1)
