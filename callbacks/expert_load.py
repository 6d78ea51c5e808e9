"""`ExpertLoadMonitor`: expert loads, balance and per-task routing signatures in TensorBoard.

Reads only the routing record the module publishes (`pl_module.routing_stats`, `RoutingStats`,
and `pl_module.routing_tasks`, the batch's task ids). Loads are logged as fractions, so a re-run
forward under activation checkpointing cannot inflate them.

Logged keys:
  moe/layer_{i}/load_e{j}       share of layer i's counted token assignments going to expert j
  moe/layer_{i}/load_cv         coefficient of variation of those shares (0 = perfectly balanced)
  moe/layer_{i}/entropy         mean per-token router entropy (nats)
  val_routing/{task}/e{j}       mean routing signature g of a task's validation samples
  val_routing/layer_{i}/nmi     task–expert NMI of top-1 choices on the validation set
  val_routing/layer_{i}/nmi_shuffled   the same with task labels shuffled (chance level)
"""

from __future__ import annotations

import lightning as L
import torch

from tagmoe_lit.align import routing_signature
from tagmoe_lit.metrics.specialization import nmi, shuffled_nmi, task_expert_table


class ExpertLoadMonitor(L.Callback):
    """Logs expert load per layer every `every_n_steps` and routing per task at each validation."""

    def __init__(self, every_n_steps: int = 10):
        """
        Args:
            every_n_steps: log training loads every this many optimizer steps.
        """
        self.every_n_steps = every_n_steps
        self._tasks: list[torch.Tensor] = []
        self._signatures: list[torch.Tensor] = []
        self._top1: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        stats = pl_module.routing_stats
        if stats is None or trainer.global_step % self.every_n_steps:
            return
        metrics = {}
        for i, layer in enumerate(stats.layers):
            load = layer.load_E
            metrics.update({f"moe/layer_{i}/load_e{j}": load[j] for j in range(load.numel())})
            metrics[f"moe/layer_{i}/load_cv"] = load.std(unbiased=False) / load.mean()
            metrics[f"moe/layer_{i}/entropy"] = layer.entropy
        pl_module.log_dict(metrics, batch_size=batch["target"].shape[0])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        stats = pl_module.routing_stats
        if stats is None or trainer.sanity_checking:
            return
        self._tasks.append(pl_module.routing_tasks.cpu())
        self._signatures.append(routing_signature(stats).cpu())
        self._top1.append([layer.top1_counts_BE.cpu() for layer in stats.layers])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._tasks:
            return
        tasks, g = torch.cat(self._tasks), torch.cat(self._signatures)
        names = trainer.datamodule.task_names
        metrics = {}
        for t in tasks.unique().tolist():
            mean_g = g[tasks == t].mean(0)
            metrics.update({f"val_routing/{names[t]}/e{j}": mean_g[j] for j in range(mean_g.numel())})
        for i in range(len(self._top1[0])):
            top1 = torch.cat([batch[i] for batch in self._top1])
            metrics[f"val_routing/layer_{i}/nmi"] = nmi(task_expert_table(tasks, top1, len(names)))
            metrics[f"val_routing/layer_{i}/nmi_shuffled"] = shuffled_nmi(tasks, top1, len(names))
        pl_module.log_dict({k: float(v) for k, v in metrics.items()})
        self._tasks, self._signatures, self._top1 = [], [], []
