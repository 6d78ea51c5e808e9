"""Figures: labelled heatmaps (matplotlib), and figures and images logged to every TensorBoard logger.

The callbacks (`callbacks/`) log them during training; the study report (`study/report.py`) saves
the same heatmaps as PNGs. Other loggers (CSV, W&B …) have no common image API; they are skipped,
and scalars still reach them.
"""

from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state


def heatmap(values_RC: torch.Tensor, rows: Sequence[str], cols: Sequence[str], title: str, vmin: float = 0.0, vmax: float = 1.0) -> Figure:
    """A labelled heatmap with each cell's value written in it."""
    R, C = values_RC.shape
    fig = Figure(figsize=(1.2 + 0.7 * C, 0.8 + 0.35 * R), dpi=100)
    ax = fig.subplots()
    ax.imshow(values_RC.float().numpy(), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(C), labels=list(cols))
    ax.set_yticks(range(R), labels=list(rows))
    ax.set_title(title, fontsize=9)
    for r in range(R):
        for c in range(C):
            v = float(values_RC[r, c])
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < (vmin + vmax) / 2 else "black")
    fig.tight_layout()
    return fig


def log_figure(trainer: L.Trainer, tag: str, figure: Figure) -> None:
    """Log a matplotlib figure at the current global step."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(tag, figure, global_step=trainer.global_step, close=False)


def log_image(trainer: L.Trainer, tag: str, image_3HW: torch.Tensor) -> None:
    """Log a float image in [0, 1] at the current global step."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image_3HW.clamp(0, 1).cpu(), global_step=trainer.global_step)
