"""`ProgressLines`: plain progress lines (step, loss, s/step, ETA) where no progress bar can be seen.

With output to a file or a pipe (a batch job, `make fit > log`), Lightning's progress bars print
nothing useful (Rich prints nothing, TQDM rewrites one line with carriage returns), so a long run
looked dead between the model summary and the end. When stdout is not a terminal (or always, with
`when: always`), this callback prints one line every `every_n_seconds` (and every `every_n_steps`
if set), plus the first and the last step:

    step 120/1800  loss 0.1432  3.57 steps/s (0.28 s/step)  elapsed 0:00:34  ETA 0:07:51

and the same for validation, test and predict batches (`test batch 3/12 ...`). Rank 0 prints. The
loss is the step's training loss (the value `training_step` returned). Step time is quoted rather
than minutes because hosts differ (DESIGN.md pitfall 32).
"""

from __future__ import annotations

import math
import sys
import time
from datetime import timedelta
from typing import Any, Literal

import lightning as L
import torch


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"


class ProgressLines(L.Callback):
    """Periodic plain progress lines on stdout when it is not a terminal."""

    def __init__(self, every_n_seconds: float = 30.0, every_n_steps: int | None = None,
                 when: Literal["not_a_terminal", "always", "never"] = "not_a_terminal"):
        """
        Args:
            every_n_seconds: print at most this often (seconds), besides the first and last step.
            every_n_steps: also print every this many steps or batches (null: by time only).
            when: not_a_terminal (a bar is visible on a terminal, so stay quiet there), always, never.
        """
        self.every_n_seconds, self.every_n_steps, self.when = every_n_seconds, every_n_steps, when
        self.active = False
        self._train: dict[str, float] = {}  # start, last (print), first (step): validation keeps its own
        self._eval: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        terminal = sys.stdout.isatty()
        self.active = trainer.is_global_zero and (self.when == "always" or (self.when == "not_a_terminal" and not terminal))

    @staticmethod
    def _begin(first: int) -> dict[str, float]:
        now = time.monotonic()
        return {"start": now, "last": now, "first": first, "done": first}

    def _due(self, clock: dict[str, float], done: int, total: float) -> bool:
        now = time.monotonic()
        due = (done == clock["first"] + 1 or done >= total or now - clock["last"] >= self.every_n_seconds
               or (self.every_n_steps is not None and done % self.every_n_steps == 0))
        if due:
            clock["last"] = now
        return due

    @staticmethod
    def _line(clock: dict[str, float], what: str, done: int, total: float, extra: str = "") -> str:
        elapsed = time.monotonic() - clock["start"]
        rate = (done - clock["first"]) / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("inf")
        of = f"/{int(total)}" if math.isfinite(total) else ""
        unit = what.split()[-1]
        units = unit + ("es" if unit.endswith("ch") else "s")  # steps, batches
        pace = f"  {rate:.2f} {units}/s ({1 / rate:.2f} s/{unit})" if rate > 0 else ""
        return f"{what} {done}{of}{extra}{pace}  elapsed {_clock(elapsed)}  ETA {_clock(eta)}"

    # -- training ----------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train = self._begin(trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.active:
            return
        step = trainer.global_step
        total = trainer.max_steps if trainer.max_steps > 0 else float(trainer.estimated_stepping_batches)
        if not self._due(self._train, step, total):
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        extra = f"  loss {float(loss):.4f}" if isinstance(loss, torch.Tensor) else ""
        print(self._line(self._train, "step", step, total, extra), flush=True)

    # -- validation, test, predict ------------------------------------------------------------
    def _eval_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._eval = self._begin(0)

    def _eval_batch_end(self, stage: str, trainer: L.Trainer, totals: list) -> None:
        if not self.active or trainer.sanity_checking:
            return
        self._eval["done"] += 1
        done, total = int(self._eval["done"]), float(sum(totals))
        if self._due(self._eval, done, total):
            print(self._line(self._eval, f"{stage} batch", done, total), flush=True)

    on_validation_start = on_test_start = on_predict_start = _eval_start

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._eval_batch_end("validation", trainer, trainer.num_val_batches)

    def on_test_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._eval_batch_end("test", trainer, trainer.num_test_batches)

    def on_predict_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._eval_batch_end("predict", trainer, trainer.num_predict_batches)
