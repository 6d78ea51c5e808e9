"""Rectified flow (flow matching) objective and timestep samplers.

    x_σ = (1 − σ)·x0 + σ·ε,   target velocity v = ε − x0,   σ ∈ [0, 1] (σ = 1 is pure noise)

The network gets σ itself as its timestep (diffusers' Qwen-Image takes σ in [0, 1]). Losses are
returned per sample so the caller can log them binned by σ (minRF) and choose the reduction.
Samplers draw from an explicit `torch.Generator`, so a training sample's σ and noise are a function
of (seed, step, its position in the step's global batch): resume is bit-exact (DESIGN.md pitfall 14)
and 2 ranks × B draw what 1 rank × 2B does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 / Qwen-Image time shift: σ' = s·σ / (1 + (s − 1)·σ); s > 1 spends more steps at high noise."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


class TimestepSampler(ABC):
    """Draws the training σ of n samples from a generator; subclass it to select your own by `class_path`."""

    @abstractmethod
    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[n] values of σ in [0, 1]."""


class LogitNormalSampler(TimestepSampler):
    """σ = shift(sigmoid(mean + std·z)), z ~ N(0, 1): the SD3 / Qwen-Image training distribution."""

    def __init__(self, mean: float = 0.0, std: float = 1.0, shift: float = 1.0):
        """
        Args:
            mean: location of the logit-normal.
            std: scale of the logit-normal.
            shift: time shift applied after sampling (1.0 = none).
        """
        self.mean, self.std, self.shift = mean, std, shift

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, generator=generator)
        return shift_sigma(torch.sigmoid(self.mean + self.std * z), self.shift)


class UniformSampler(TimestepSampler):
    """σ ~ U(0, 1), then shifted."""

    def __init__(self, shift: float = 1.0):
        """
        Args:
            shift: time shift applied after sampling (1.0 = none).
        """
        self.shift = shift

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return shift_sigma(torch.rand(n, generator=generator), self.shift)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε for token tensors [B, T, P]."""
    s = sigma_B.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def flow_loss(pred_v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error against the velocity ε − x0: [B]."""
    return (pred_v.float() - (noise - x0).float()).pow(2).flatten(1).mean(1)
