"""`SampleGrid`: fixed validation prompts per task, rendered as source | target | generated.

The first `samples_per_task` validation samples of each task are kept as they pass (the validation
split is fixed, so they are the same samples every time) and generated with the module's own
`generate` after the validation pass; the grid has one row per sample and is logged as
`val_samples/grid` (TensorBoard image) and, with `save_dir`, as a PNG per validation; bucketed data
with several image sizes gets one grid per size (`val_samples/grid_{H}x{W}`).
Text-to-image rows show a blank source. Sampling costs `steps` (×2 with guidance) forwards of
the kept samples, so the grid uses its own, cheaper sampler settings by default.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torchvision
from lightning.pytorch.utilities import move_data_to_device
from torch.utils.data import default_collate

from tagmoe_lit.figures import log_image
from tagmoe_lit.sampling import EulerSampler


class SampleGrid(L.Callback):
    """Logs source | target | generated rows for a few fixed validation samples of every task."""

    def __init__(
        self,
        samples_per_task: int = 1,
        every_n_validations: int = 1,
        sampler: EulerSampler | None = None,
        scale: int = 2,
        save_dir: str | None = None,
    ):
        """
        Args:
            samples_per_task: rows per task.
            every_n_validations: draw the grid at every n-th validation (the sanity check is skipped).
            sampler: sampler for the grid (default: the module's settings with 15 steps at most).
            scale: nearest-neighbour upscaling of the grid, so 32-px images are visible.
            save_dir: also write `grid_step{N}.png` here (default: only TensorBoard).
        """
        self.samples_per_task, self.every_n_validations = samples_per_task, every_n_validations
        self.sampler, self.scale, self.save_dir = sampler, scale, save_dir
        self._kept: dict[int, list[dict]] = {}
        self._validations = 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._kept = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            return
        for i, task in enumerate(batch["task"].tolist()):
            rows = self._kept.setdefault(task, [])
            if len(rows) < self.samples_per_task:
                rows.append({k: v[i].detach().cpu().clone() if isinstance(v, torch.Tensor) else v[i] for k, v in batch.items()})

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._kept:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations or not trainer.is_global_zero:
            return
        by_size: dict[tuple[int, ...], list[dict]] = {}  # bucketed data: one grid per image size
        for task in sorted(self._kept):
            for row in self._kept[task]:
                by_size.setdefault(tuple(row["target"].shape[-2:]), []).append(row)
        for size, rows in by_size.items():
            batch = move_data_to_device(default_collate(rows), pl_module.device)
            generated, _ = pl_module.generate(batch, self._sampler(pl_module))
            grid = self.render(batch["source"], batch["target"], generated)
            name = "grid" if len(by_size) == 1 else f"grid_{size[0]}x{size[1]}"
            log_image(trainer, f"val_samples/{name}", grid)
            if self.save_dir is not None:
                Path(self.save_dir).mkdir(parents=True, exist_ok=True)
                torchvision.utils.save_image(grid, Path(self.save_dir) / f"{name}_step{trainer.global_step}.png")

    def _sampler(self, pl_module: L.LightningModule) -> EulerSampler:
        if self.sampler is not None:
            return self.sampler
        s = pl_module.sampler
        return EulerSampler(min(s.steps, 15), s.guidance, s.negative_prompt, s.shift)

    def render(self, source: torch.Tensor, target: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """[3, H', W'] grid: a row of (source, target, generated) per sample, upscaled."""
        triples = torch.stack([source, target, generated], dim=1).flatten(0, 1).float().cpu()
        grid = torchvision.utils.make_grid(triples, nrow=3, padding=2, pad_value=1.0)
        return torch.nn.functional.interpolate(grid[None], scale_factor=self.scale, mode="nearest")[0]
