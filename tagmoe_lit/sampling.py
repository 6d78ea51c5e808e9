"""Flow-matching Euler sampler with time shift and true classifier-free guidance.

Integrates dx/dσ = v(x, σ) from σ = 1 (noise) to σ = 0 (image) on a shifted grid. With
`guidance` ≠ 1 each step also runs the negative prompt (the reference image is kept, as
Qwen-Image-Edit's true CFG does) and extrapolates: v = v_neg + w·(v_cond − v_neg).
The starting noise is given by the caller (the module draws it per sample from the sample's own
seed, so an image does not depend on its batch-mates) or drawn from an explicit generator.
"""

from __future__ import annotations

from typing import Callable

import torch

from tagmoe_lit.flow import shift_sigma

Velocity = Callable[[torch.Tensor, torch.Tensor, tuple[int, int], list[str], torch.Tensor], tuple[torch.Tensor, object]]


class EulerSampler:
    """Settings of the sampler; call it with the model's velocity function."""

    def __init__(self, steps: int = 30, guidance: float = 4.0, negative_prompt: str = "", shift: float = 1.0):
        """
        Args:
            steps: Euler steps from σ = 1 to σ = 0.
            guidance: classifier-free guidance scale w (1.0 = no guidance, one forward per step).
            negative_prompt: instruction of the unconditional branch; "" is the null instruction
                the module's conditioning dropout trains (Qwen-Image's own checkpoints use " ").
            shift: time shift of the σ grid (> 1 spends more steps at high noise).
        """
        self.steps, self.guidance, self.negative_prompt, self.shift = steps, guidance, negative_prompt, shift

    @torch.no_grad()
    def __call__(
        self,
        velocity: Velocity,
        instructions: list[str],
        reference: torch.Tensor,
        grid: tuple[int, int],
        token_channels: int,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return clean image tokens [B, h·w, P]; `reference` holds reference tokens (blank = zeros).

        `noise` ([B, h·w, P]) is the start at σ = 1; without it, it is drawn from `generator`.
        """
        B = len(instructions)
        if noise is None:
            noise = torch.randn(B, grid[0] * grid[1], token_channels, generator=generator)
        x = noise.to(reference)
        sigmas = shift_sigma(torch.linspace(1.0, 0.0, self.steps + 1), self.shift).tolist()
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            sigma = torch.full((B,), s, device=x.device)
            v = velocity(x, reference, grid, instructions, sigma)[0]
            if self.guidance != 1.0:
                v_neg = velocity(x, reference, grid, [self.negative_prompt] * B, sigma)[0]
                v = v_neg + self.guidance * (v - v_neg)
            x = x + (s_next - s) * v
        return x
