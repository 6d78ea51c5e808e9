"""`RoutingSignatureMonitor`: what routing looks like per task and per tag, and how the head reads it.

At each validation, over the whole validation set:
  images  val_routing/heatmap/layer_{i}   task × expert mean routing signature of MoE layer i
          val_routing/heatmap/tags        tag × expert mean signature g (mean over layers)
          val_align/semantic_cosine       task × task cosine of the mean semantic vectors s: which
                                          tasks the tag embeddings already tell apart
  scalars val_routing/{task}/e{j}         task's mean signature g, expert j
          val_align/{task}/cos            mean cos(H(g), s) of the task's samples (1 − its align loss)
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from callbacks.routing_collector import RoutingCollector, ValidationRouting, task_names
from tagmoe_lit.figures import heatmap, log_figure


def mean_by_task(values_BX: torch.Tensor, task_B: torch.Tensor, tasks: list[int]) -> torch.Tensor:
    """[len(tasks), X] mean of the rows of each task."""
    return torch.stack([values_BX[task_B == t].float().mean(0) for t in tasks])


class RoutingSignatureMonitor(RoutingCollector):
    """Task × expert and tag × expert heatmaps, per-task signatures and head cosines."""

    def __init__(self, heatmaps: bool = True):
        """
        Args:
            heatmaps: draw the heatmap images (scalars are always logged).
        """
        super().__init__()
        self.heatmaps = heatmaps

    def on_routing(self, trainer: L.Trainer, pl_module: L.LightningModule, routing: ValidationRouting) -> None:
        names = task_names(trainer, routing.task_B)
        tasks = sorted(routing.task_B.unique().tolist())
        rows = [names[t] for t in tasks]
        g_TE = mean_by_task(routing.signature_BE, routing.task_B, tasks)
        E = g_TE.shape[1]
        experts = [f"e{j}" for j in range(E)]
        metrics = {f"val_routing/{names[t]}/e{j}": float(g_TE[r, j]) for r, t in enumerate(tasks) for j in range(E)}
        if routing.align_cos_B is not None:
            cos_T = mean_by_task(routing.align_cos_B[:, None], routing.task_B, tasks)[:, 0]
            metrics.update({f"val_align/{names[t]}/cos": float(cos_T[r]) for r, t in enumerate(tasks)})
        pl_module.log_dict(metrics)
        if not (self.heatmaps and trainer.is_global_zero):
            return
        step = trainer.global_step
        for i, sig_BE in enumerate(routing.signature_LBE):
            sig_TE = mean_by_task(sig_BE, routing.task_B, tasks)
            log_figure(trainer, f"val_routing/heatmap/layer_{i}", heatmap(sig_TE, rows, experts, f"MoE layer {i}: mean router probability (step {step})"))
        if routing.semantic_BD is not None:
            s_TD = F.normalize(mean_by_task(routing.semantic_BD, routing.task_B, tasks), dim=1)
            log_figure(trainer, "val_align/semantic_cosine", heatmap(s_TD @ s_TD.T, rows, rows, f"cosine of task semantic vectors s (step {step})", vmin=-1.0))
        present = routing.tags_BV.sum(0) > 0
        if not present.any():  # untagged data: no tag rows to draw
            return
        tag_names = [n for n, keep in zip(pl_module.schema.names, present.tolist()) if keep]
        tag_VE = (routing.tags_BV[:, present].T @ routing.signature_BE) / routing.tags_BV[:, present].sum(0)[:, None]
        log_figure(trainer, "val_routing/heatmap/tags", heatmap(tag_VE, tag_names, experts, f"tag × expert signature g (step {step})"))
