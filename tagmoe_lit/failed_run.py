"""A run that fails before its first batch leaves nothing behind.

`TagMoECLI` notes which of a run's output directories (`trainer.default_root_dir`, each logger's
save_dir / root_dir / log_dir, the checkpoint directory) do not exist yet, and `FirstBatch` notes
whether any batch has started. If the run then fails before its first batch (a checkpoint from
another model, a manifest that cannot be read, a missing image), the directories this run created
are removed, so no empty `tensorboard/version_N` or `checkpoints` directory is left to mislead the
next look at `runs/`. Once a batch has run, everything is kept for inspection.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L


class FirstBatch(L.Callback):
    """Records whether any training, validation, test or predict batch has started."""

    def __init__(self) -> None:
        self.started = False

    def _start(self, *args, **kwargs) -> None:
        self.started = True

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _start


def output_dirs(trainer: L.Trainer) -> list[Path]:
    """Directories a run of `trainer` may create: its root, its loggers' directories, its checkpoint folder."""
    dirs = [trainer.default_root_dir]
    for logger in trainer.loggers:
        for name in ("save_dir", "root_dir", "log_dir"):
            try:  # a logger's property may reach out (a tracking server); a directory it cannot name is not ours
                dirs.append(getattr(logger, name, None))
            except Exception:  # noqa: BLE001
                continue
    checkpoint = trainer.checkpoint_callback
    dirs.append(getattr(checkpoint, "dirpath", None) if checkpoint is not None else None)
    return [Path(d).absolute() for d in dirs if d]


def not_yet_there(trainer: L.Trainer) -> list[Path]:
    """The output directories of `trainer` that do not exist now (so a failing run would have made them)."""
    return sorted({d for d in output_dirs(trainer) if not d.exists()}, key=lambda d: len(d.parts))


def remove_created(created: list[Path]) -> None:
    """Remove the directories of `created` (from `not_yet_there`) that exist now, outermost first."""
    removed: list[Path] = []
    for d in created:
        if d.is_dir() and not any(d.is_relative_to(r) for r in removed):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
