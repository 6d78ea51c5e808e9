"""`PredictionWriter`: `predict` writes one PNG per generated image and a JSONL describing each.

Each JSONL row: `name`, `image` (PNG file name), `instruction`, `has_source`, `task` (when the data
knows it), and `signature` — the routing signature g (mean over MoE layers) with `signature_layers`
per layer, averaged over the sampler's conditional forwards. Files are written under temporary
names and renamed when the whole prediction run has finished, so an interrupted run leaves no
half-written output behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch
import torchvision
from lightning.pytorch.callbacks import BasePredictionWriter

from tagmoe_lit.io import atomic_write_text


class PredictionWriter(BasePredictionWriter):
    """Writes `{output_dir}/{name}.png` and `{output_dir}/predictions.jsonl`."""

    def __init__(self, output_dir: str | None = None):
        """
        Args:
            output_dir: where to write (default: `predictions/` in the run's log directory).
        """
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self._pending: list[tuple[Path, Path]] = []
        self._rows: list[dict] = []
        self._dir = Path(".")

    def _directory(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending, self._rows = [], []
        self._dir = self._directory(trainer)  # collective under DDP (trainer.log_dir): ask on every rank

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        directory = self._dir
        directory.mkdir(parents=True, exist_ok=True)
        signature_LBE = prediction["signature_LBE"]
        names = batch.get("name") or [f"{i:05d}" for i in batch["index"].tolist()]
        for b, name in enumerate(names):
            final = directory / f"{name}.png"
            tmp = directory / f".{name}.rank{trainer.global_rank}.png.tmp"  # ranks may hold the same padded sample
            torchvision.utils.save_image(prediction["images"][b].float().cpu(), tmp, format="png")
            self._pending.append((tmp, final))
            row = {"name": name, "image": final.name, "instruction": batch["instruction"][b], "has_source": bool(batch["has_source"][b])}
            task = int(batch["task"][b])
            if task >= 0 and hasattr(trainer.datamodule, "task_names"):
                row["task"] = trainer.datamodule.task_names[task]
            if signature_LBE is not None:
                row["signature"] = [round(v, 5) for v in signature_LBE[:, b].mean(0).tolist()]
                row["signature_layers"] = [[round(v, 5) for v in layer] for layer in signature_LBE[:, b].tolist()]
            self._rows.append(row)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for tmp, final in self._pending:
            os.replace(tmp, final)
        rows = self._rows
        if trainer.world_size > 1:  # one JSONL for all ranks, each sample once
            parts = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, rows)
            rows = list({row["name"]: row for part in parts for row in part}.values())
        if trainer.is_global_zero:
            jsonl = self._dir / "predictions.jsonl"
            atomic_write_text(jsonl, "".join(json.dumps(row) + "\n" for row in rows))
            print(f"\nWrote {len(rows)} images and {jsonl}")
        self._pending, self._rows = [], []
