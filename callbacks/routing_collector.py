"""`RoutingCollector`: the shared base of the callbacks that read routing on validation data.

It gathers the module's published `RoutingRecord` after every validation batch (not during the
sanity check, whose model is untrained) and hands the whole validation set's routing to
`on_routing` once per validation. Subclasses decide what to compute and log from it. Each rank
sees its own share of the validation set (the figures are per rank; rank 0's are drawn).
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch


@dataclass
class ValidationRouting:
    """One validation pass's routing, samples concatenated in loader order (CPU tensors)."""

    task_B: torch.Tensor
    tags_BV: torch.Tensor
    signature_LBE: torch.Tensor  # per-layer mean router probabilities of each sample's tokens
    top1_counts_LBE: torch.Tensor  # per-layer count of each sample's tokens per top-1 expert
    semantic_BD: torch.Tensor | None  # s (None without the alignment branch)
    align_cos_B: torch.Tensor | None  # cos(H(g), s)

    @property
    def signature_BE(self) -> torch.Tensor:
        """The routing signature g (mean over layers)."""
        return self.signature_LBE.mean(0)


class RoutingCollector(L.Callback):
    """Collects `pl_module.routing` over a validation pass; subclasses implement `on_routing`."""

    def __init__(self) -> None:
        self._records: list = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._records = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        record = pl_module.routing
        if record is not None and not trainer.sanity_checking and bool((record.task_B >= 0).all()):
            self._records.append(record)  # samples of unknown task (id -1) cannot be grouped by task

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records, self._records = self._records, []
        if records:
            self.on_routing(trainer, pl_module, _concat(records))

    def on_routing(self, trainer: L.Trainer, pl_module: L.LightningModule, routing: ValidationRouting) -> None:
        raise NotImplementedError


def task_names(trainer: L.Trainer, task_B: torch.Tensor) -> list[str]:
    """Names of task ids 0..max: the data module's `task_names`, else the ids themselves."""
    names = getattr(trainer.datamodule, "task_names", None)
    return list(names) if names is not None else [str(i) for i in range(int(task_B.max()) + 1)]


def _concat(records: list) -> ValidationRouting:
    def cat(tensors: list[torch.Tensor | None], dim: int = 0) -> torch.Tensor | None:
        return None if tensors[0] is None else torch.cat([t.cpu() for t in tensors], dim)

    return ValidationRouting(
        task_B=cat([r.task_B for r in records]),
        tags_BV=cat([r.tags_BV for r in records]),
        signature_LBE=cat([r.signature_LBE for r in records], dim=1),
        top1_counts_LBE=cat([torch.stack([layer.top1_counts_BE for layer in r.stats.layers]) for r in records], dim=1),
        semantic_BD=cat([r.semantic_BD for r in records]),
        align_cos_B=cat([r.align_cos_B for r in records]),
    )
