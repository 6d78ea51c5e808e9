"""`ExpertLoadMonitor`: expert loads and balance during training, with dead-expert and collapse warnings.

Reads only the module's published `RoutingRecord` (`pl_module.routing`). Loads are fractions of the
counted token assignments of the step's last micro-batch on this rank, so a re-run forward under
activation checkpointing cannot inflate them. Rank 0 logs; the health counters live in the
callback and restart from zero when a run is resumed.

Logged every `every_n_steps` optimizer steps:
  moe/layer_{i}/load_e{j}        share of layer i's token assignments that went to expert j
  moe/layer_{i}/load_cv          coefficient of variation of those shares (0 = perfectly balanced)
  moe/layer_{i}/entropy          mean per-token router entropy (nats)
  moe/layer_{i}/sample_entropy   mean entropy of each sample's signature: near 0 means every image
                                 goes to one expert (the MoE became a prompt-driven switch)
  moe/layer_{i}/dead_experts     experts under `min_share` for `patience` checks in a row
  moe/layer_{i}/load             histogram of top-k choices over expert ids (TensorBoard)

A warning names a layer's expert the first time it has stayed under `min_share` (dead) or over
`max_share` (collapse: the layer is one expert) for `patience` consecutive checks.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from tagmoe_lit.metrics.entropy import entropy


class ExpertLoadMonitor(L.Callback):
    """Per-layer, per-expert training load, balance, entropy and health checks."""

    def __init__(self, every_n_steps: int = 10, min_share: float = 0.02, max_share: float = 0.9, patience: int = 5, histograms: bool = True):
        """
        Args:
            every_n_steps: log and check loads every this many optimizer steps.
            min_share: an expert with a smaller load share than this is starving.
            max_share: an expert with a larger load share than this has taken the layer over.
            patience: consecutive checks before an expert counts as dead or collapsed (and a warning).
            histograms: also log a load histogram per layer to TensorBoard.
        """
        self.every_n_steps, self.min_share, self.max_share = every_n_steps, min_share, max_share
        self.patience, self.histograms = patience, histograms
        self._low: torch.Tensor | None = None  # [L, E] consecutive checks under min_share
        self._high: torch.Tensor | None = None
        self._warned: set[tuple[str, int, int]] = set()
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        record = pl_module.routing
        step = trainer.global_step
        # once per optimizer step: with gradient accumulation this hook runs for every micro-batch
        if record is None or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        load_LE = torch.stack([layer.load_E for layer in record.stats.layers]).float().cpu()
        self.check_health(load_LE, step)
        metrics = {}
        for i, layer in enumerate(record.stats.layers):
            load = load_LE[i]
            metrics.update({f"moe/layer_{i}/load_e{j}": load[j] for j in range(load.numel())})
            metrics[f"moe/layer_{i}/load_cv"] = load.std(unbiased=False) / load.mean()
            metrics[f"moe/layer_{i}/entropy"] = layer.entropy
            metrics[f"moe/layer_{i}/sample_entropy"] = entropy(layer.signature_BE.float()).mean()
            metrics[f"moe/layer_{i}/dead_experts"] = float((self._low[i] >= self.patience).sum())
        if trainer.is_global_zero:  # straight to the loggers: on our schedule, not log_every_n_steps
            for logger in trainer.loggers:
                logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
            if self.histograms:
                self._log_histograms(trainer, record)

    def check_health(self, load_LE: torch.Tensor, step: int) -> None:
        """One check of the [L, E] load shares at `step`: count the checks in a row each expert has been
        under `min_share` (dead) or over `max_share` (collapse), and warn once per expert and kind
        when a count reaches `patience`."""
        if self._low is None or self._low.shape != load_LE.shape:
            self._low, self._high = torch.zeros_like(load_LE), torch.zeros_like(load_LE)
        self._low = torch.where(load_LE < self.min_share, self._low + 1, 0)
        self._high = torch.where(load_LE > self.max_share, self._high + 1, 0)
        for kind, run, share in (("dead", self._low, f"under {self.min_share:.0%}"), ("collapse", self._high, f"over {self.max_share:.0%}")):
            for i, j in (run >= self.patience).nonzero().tolist():
                if (kind, i, j) not in self._warned:
                    self._warned.add((kind, i, j))
                    rank_zero_warn(
                        f"MoE layer {i}, expert {j}: load share {share} for {self.patience} checks in a row "
                        f"(step {step}, {kind}); raise `model.lambda_lb` or try the aux_free router."
                    )

    def _log_histograms(self, trainer: L.Trainer, record) -> None:
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            for i, layer in enumerate(record.stats.layers):
                counts = layer.counts_E.float().cpu()
                ids = torch.arange(counts.numel(), dtype=torch.float64)
                logger.experiment.add_histogram_raw(
                    f"moe/layer_{i}/load",
                    min=0.0, max=float(counts.numel() - 1), num=float(counts.sum()),
                    sum=float((ids * counts).sum()), sum_squares=float((ids.pow(2) * counts).sum()),
                    bucket_limits=(ids + 0.5).tolist(), bucket_counts=counts.tolist(),
                    global_step=trainer.global_step,
                )
