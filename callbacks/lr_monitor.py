"""`LearningRateMonitor`: Lightning's, stepping aside (with one warning) when the run has no logger.

Lightning's `LearningRateMonitor` raises `MisconfigurationException` in `on_train_start` when the
trainer has no logger, so `--trainer.logger false` (a common way to run quietly) would crash any
config that lists it, as `experiments/base.yaml` does. This one warns once that learning rates are
not recorded and does nothing for the rest of the run; with a logger it is Lightning's, unchanged.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor as LightningLearningRateMonitor
from lightning.pytorch.utilities import rank_zero_warn


class LearningRateMonitor(LightningLearningRateMonitor):
    """Logs each optimizer's learning rate (Lightning's arguments); without a logger, warns once and is off."""

    off = False

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self.off = not trainer.loggers
        if self.off:
            rank_zero_warn("LearningRateMonitor: this run has no logger (trainer.logger: false), so learning rates are "
                           "not recorded; set trainer.logger to record them.")
            return
        super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self.off:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self.off:
            super().on_train_epoch_start(trainer, *args, **kwargs)
