"""Flow-matching Euler samplers with true classifier-free guidance.

Both integrate dx/dσ = v(x, σ) from σ = 1 (noise) to σ = 0 (image). With guidance each step also
runs the negative prompt (the reference image is kept, as Qwen-Image-Edit's true CFG does) and
extrapolates: v = v_neg + w·(v_cond − v_neg), optionally rescaled per token to the conditional
prediction's norm (Qwen-Image's pipelines and the TAG-MoE release do).

- `EulerSampler`: the kit's evaluation sampler: N Euler steps on a σ grid with a constant shift.
- `QwenImageSampler`: the release's pipeline (`pipeline_qwenimage_tagmoe.py`): diffusers'
  `FlowMatchEulerDiscreteScheduler` with Qwen-Image's scheduler config, σ = linspace(1, 1/N, N)
  shifted by the resolution-dependent μ, the model called with t/1000, CFG 4 with the norm rescale,
  negative prompt " ".

The starting noise is given by the caller (the module draws it per sample from the sample's own
seed, so an image does not depend on its batch-mates) or drawn from an explicit generator.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from tagmoe_lit.flow import shift_sigma

Velocity = Callable[[torch.Tensor, torch.Tensor, tuple[int, int], list[str], torch.Tensor], tuple[torch.Tensor, object]]

# Qwen-Image's scheduler/scheduler_config.json (the release loads the base model's scheduler)
QWEN_IMAGE_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
    "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02, "time_shift_type": "exponential",
    "use_dynamic_shifting": True, "invert_sigmas": False, "stochastic_sampling": False,
    "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}


def guided_velocity(
    velocity: Velocity, x: torch.Tensor, reference: torch.Tensor, grid: tuple[int, int], instructions: list[str],
    sigma: torch.Tensor, guidance: float, negative_prompt: str, renormalize: bool,
) -> torch.Tensor:
    """v_neg + w·(v_cond − v_neg) (w = 1: the conditional velocity alone, one forward); with
    `renormalize`, each token's guided velocity is scaled to the norm of its conditional one."""
    v = velocity(x, reference, grid, instructions, sigma)[0]
    if guidance == 1.0:
        return v
    v_neg = velocity(x, reference, grid, [negative_prompt] * len(instructions), sigma)[0]
    guided = v_neg + guidance * (v - v_neg)
    if renormalize:
        guided = guided * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))
    return guided


class FlowSampler:
    """The loop both samplers share: noise at σ = 1, then one guided velocity and one update per step
    of the subclass's schedule (`_steps`). Call it with the model's velocity function."""

    steps: int
    guidance: float
    negative_prompt: str
    renormalize: bool

    def _steps(self, x: torch.Tensor) -> Iterator[tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]:
        """(σ fed to the model [B], update (v, x) → next x) for every step."""
        raise NotImplementedError

    def _guidance(self) -> float:
        return self.guidance

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
        if noise is None:
            noise = torch.randn(len(instructions), grid[0] * grid[1], token_channels, generator=generator)
        x = noise.to(reference)
        for sigma, update in self._steps(x):
            v = guided_velocity(velocity, x, reference, grid, instructions, sigma, self._guidance(), self.negative_prompt,
                                self.renormalize)
            x = update(v, x)
        return x


class EulerSampler(FlowSampler):
    """The kit's sampler: N Euler steps on linspace(1, 0, N + 1) with a constant time shift."""

    def __init__(self, steps: int = 30, guidance: float = 4.0, negative_prompt: str = "", shift: float = 1.0,
                 renormalize: bool = False):
        """
        Args:
            steps: Euler steps from σ = 1 to σ = 0.
            guidance: classifier-free guidance scale w (1.0 = no guidance, one forward per step).
            negative_prompt: instruction of the unconditional branch; "" is the null instruction
                the module's conditioning dropout trains (Qwen-Image's own checkpoints use " ").
            shift: time shift of the σ grid (> 1 spends more steps at high noise).
            renormalize: rescale each guided token velocity to its conditional norm (Qwen-Image's rule).
        """
        self.steps, self.guidance, self.negative_prompt, self.shift = steps, guidance, negative_prompt, shift
        self.renormalize = renormalize

    def _steps(self, x):
        sigmas = shift_sigma(torch.linspace(1.0, 0.0, self.steps + 1), self.shift).tolist()
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            yield torch.full((x.shape[0],), s, device=x.device), lambda v, x, d=s_next - s: x + d * v


class QwenImageSampler(FlowSampler):
    """The TAG-MoE release's sampling loop (see the module docstring)."""

    def __init__(self, steps: int = 30, guidance: float = 4.0, negative_prompt: str = " ", renormalize: bool = True,
                 scheduler: dict | None = None):
        """
        Args:
            steps: scheduler steps (the release: 30).
            guidance: true CFG scale (the release: 4.0); guidance runs only when it is above 1, as there.
            negative_prompt: the release's (an empty one becomes " ").
            renormalize: rescale the guided velocity per token to the conditional one's norm.
            scheduler: `FlowMatchEulerDiscreteScheduler` settings over Qwen-Image's (`QWEN_IMAGE_SCHEDULER`).
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        unknown = sorted(set(scheduler or {}) - set(QWEN_IMAGE_SCHEDULER))
        if unknown:
            raise ValueError(f"QwenImageSampler: unknown scheduler setting(s) {unknown}; known: {sorted(QWEN_IMAGE_SCHEDULER)}.")
        self.steps, self.guidance, self.renormalize = steps, guidance, renormalize
        self.negative_prompt = negative_prompt if negative_prompt.strip() else " "
        self.scheduler = FlowMatchEulerDiscreteScheduler(**{**QWEN_IMAGE_SCHEDULER, **(scheduler or {})})

    def mu(self, tokens: int) -> float:
        """The resolution-dependent shift: linear in the number of target tokens (diffusers' `calculate_shift`)."""
        c = self.scheduler.config
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        return c.base_shift + slope * (tokens - c.base_image_seq_len)

    def _guidance(self) -> float:
        return self.guidance if self.guidance > 1 else 1.0

    def _steps(self, x):
        import numpy as np

        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / self.steps, self.steps), device=x.device, mu=self.mu(x.shape[1]))
        self.scheduler.set_begin_index(0)
        for t in self.scheduler.timesteps:  # the release feeds the transformer t / 1000, in the latents' dtype
            yield t.expand(x.shape[0]).to(x.dtype) / 1000, lambda v, x, t=t: self.scheduler.step(v, t, x, return_dict=False)[0]
