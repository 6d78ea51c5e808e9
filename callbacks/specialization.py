"""`SpecializationMonitor`: does each MoE layer's top-1 choice carry the task? NMI on validation data.

Logged keys (per validation, on the whole validation set):
  val_routing/layer_{i}/nmi            task–expert NMI of top-1 token choices
  val_routing/layer_{i}/nmi_shuffled   the same with the samples' task labels shuffled: the chance
                                       level for this table size; only the gap means specialization
"""

from __future__ import annotations

import lightning as L

from callbacks.routing_collector import RoutingCollector, ValidationRouting, task_names
from tagmoe_lit.metrics.specialization import nmi, shuffled_nmi, task_expert_table


class SpecializationMonitor(RoutingCollector):
    """Task–expert normalized mutual information per MoE layer, beside its shuffled-task baseline."""

    def on_routing(self, trainer: L.Trainer, pl_module: L.LightningModule, routing: ValidationRouting) -> None:
        num_tasks = len(task_names(trainer, routing.task_B))
        metrics = {}
        for i, top1_BE in enumerate(routing.top1_counts_LBE):
            metrics[f"val_routing/layer_{i}/nmi"] = nmi(task_expert_table(routing.task_B, top1_BE, num_tasks))
            metrics[f"val_routing/layer_{i}/nmi_shuffled"] = shuffled_nmi(routing.task_B, top1_BE, num_tasks)
        pl_module.log_dict(metrics)
