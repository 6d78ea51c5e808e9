"""The optimizer (any class by `class_path`, its own `init_args`) and the learning-rate schedule.

    model:
      optimizer:
        class_path: torch.optim.AdamW          # or bitsandbytes.optim.AdamW8bit, torch.optim.SGD, …
        init_args: {lr: 3.0e-3, betas: [0.9, 0.99], weight_decay: 0.0}

LightningCLI turns that block into a callable `params → optimizer` (`OptimizerCallable`), so each
optimizer takes exactly its own arguments (SGD gets no betas). The schedule is linear warmup, then
an optional cosine decay to `min_lr_ratio` of the peak over `trainer.max_steps`, as a multiplier
of the optimizer's own `lr`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


class AdamW(torch.optim.AdamW):
    """torch's AdamW with the kit's defaults (β2 0.99, no weight decay): what `TagMoEModule` uses
    when no `model.optimizer` is given (base.yaml names torch.optim.AdamW with the same values)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, eps: float = 1e-8):
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


@dataclass(frozen=True)
class WarmupCosine:
    """lr multiplier at optimizer step `step`: (step+1)/warmup, then cosine to `min_lr_ratio` (or flat)."""

    warmup_steps: int = 50
    cosine_decay: bool = True
    min_lr_ratio: float = 0.1
    total_steps: int | None = None  # trainer.max_steps; None: no decay

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.cosine_decay or self.total_steps is None:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(factory: OptimizerFactory, params: list[torch.nn.Parameter], schedule: WarmupCosine) -> dict[str, Any]:
    """Lightning's `configure_optimizers` answer: the optimizer and its per-step schedule."""
    optimizer = factory(params)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"model.optimizer built a {type(optimizer).__name__}, not a torch.optim.Optimizer; give the "
                        "class_path of an optimizer class, e.g. torch.optim.AdamW or bitsandbytes.optim.AdamW8bit.")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
