"""Evaluation at fixed noise (validation and test) and the per-task test report.

A validation loss at random σ and noise would move with the draw, so every evaluated sample gets
fixed noise (seeded by its dataset index) at fixed σ ∈ {0.25, 0.5, 0.75}, once with and once
without its instruction and reference: the ratio of the two is the conditioning gain. `test` adds
per-sample scores of sampled edits against the data's exact targets (SynthTAG) and gathers
everything into a `TaskReport`, merged over ranks.

Only the σ = 0.5 conditional forward computes routing terms (balance, alignment, entropy) and
publishes routing for callbacks; the other five forwards of a batch give flow losses only, so an
evaluation batch all-reduces the expert counts once, not six times.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch
import torch.distributed as dist

from tagmoe_lit.metrics.editing import confusion, edit_metrics, source_alternatives
from tagmoe_lit.metrics.report import TaskReport

if TYPE_CHECKING:
    from tagmoe_lit.module import TagMoEModule

EVAL_SIGMAS = (0.25, 0.5, 0.75)
ROUTING_SIGMA = 0.5  # the forward whose routing terms are logged and published


def fixed_noise_terms(model: TagMoEModule, batch: dict) -> tuple[dict[str, float], torch.Tensor]:
    """Batch means of every term (routing terms at σ = 0.5) and the conditional flow loss per sample
    [B] (mean over σ); the module's published routing is the σ = 0.5 conditional forward's."""
    x = batch["target"]
    B = x.shape[0]
    noise = model.fixed_noise(batch, "eval")
    images = model.encode_images(batch)  # shared by the 6 forwards below
    keep, drop = torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)
    out = {"flow_fixed": 0.0, "flow_fixed_uncond": 0.0}
    flow_B = torch.zeros(B, device=x.device)
    for s in EVAL_SIGMAS:
        sigma = torch.full((B,), s, device=x.device)
        uncond = model.loss_terms(batch, sigma, noise, drop, drop, images, routing_terms=False)
        out["flow_fixed_uncond"] += uncond["flow"].item() / len(EVAL_SIGMAS)
        terms = model.loss_terms(batch, sigma, noise, keep, keep, images, routing_terms=s == ROUTING_SIGMA)
        out["flow_fixed"] += terms["flow"].item() / len(EVAL_SIGMAS)
        flow_B += terms["flow_per_sample"] / len(EVAL_SIGMAS)
        if s == ROUTING_SIGMA:
            out.update({k: v.item() for k, v in terms.items() if k not in ("flow", "loss", "flow_per_sample")})
    return out, flow_B


class Evaluation:
    """One evaluation loop's state: running means of the fixed-noise terms and the test report."""

    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = {}
        self._report: TaskReport | None = None

    def step(self, model: TagMoEModule, batch: dict) -> torch.Tensor:
        """Fixed-noise terms of one batch into the running means; the per-sample flow loss [B]."""
        means, flow_B = fixed_noise_terms(model, batch)
        for k, v in means.items():
            self._sums.setdefault(k, []).append(v)
        return flow_B

    def epoch_metrics(self, prefix: str) -> dict[str, float]:
        """`{prefix}/{term}` means over the loop's batches, plus the conditioning gain; resets."""
        metrics = {f"{prefix}/{k}": sum(v) / len(v) for k, v in self._sums.items()}
        self._sums = {}
        if f"{prefix}/flow_fixed" in metrics:
            metrics[f"{prefix}/cond_gain"] = metrics[f"{prefix}/flow_fixed_uncond"] / metrics[f"{prefix}/flow_fixed"] - 1
        return metrics

    def start_test(self, task_names: Sequence[str] | None) -> None:
        self._report = TaskReport(task_names)

    def test_step(self, model: TagMoEModule, batch: dict, score_edits: bool) -> None:
        """Per-sample flow loss at fixed noise and, with `score_edits`, sampled-edit metrics."""
        metrics = {"flow_fixed": self.step(model, batch)}
        top1 = [layer.top1_counts_BE for layer in model.routing.stats.layers] if model.routing else []
        if score_edits:
            images, _ = model.generate(batch)
            metrics.update(edit_metrics(images, batch["target"], batch["source"], batch["mask"], batch["has_source"]))
            # did it do another (source-determined) edit instead? undefined without a source
            alternatives_KB3HW = torch.stack(list(source_alternatives(batch["source"]).values()))
            confused_B = (confusion(images, batch["target"], alternatives_KB3HW) >= 0).float()
            metrics["confusion"] = confused_B.masked_fill(~batch["has_source"].to(confused_B.device), math.nan)
        self._report.add(batch["task"], metrics, top1, batch["index"])

    def finish_test(self, model: TagMoEModule, report_name: str | None) -> dict:
        """Merge every rank's samples (a collective: every rank calls it), log the per-task scalars and,
        on rank 0, write `{report_name}.json` / `.md` into the run's log directory; the summary."""
        trainer = model.trainer
        report, self._report = self._report, None
        if trainer.world_size > 1:
            parts = [None] * trainer.world_size
            dist.all_gather_object(parts, report)
            report = TaskReport.merge(parts)
        summary = report.summary()
        for logger in model.loggers:
            logger.log_metrics(report_scalars(summary), step=model.global_step)
        directory = trainer.log_dir or trainer.default_root_dir  # collective: every rank asks
        if trainer.is_global_zero and report_name:
            json_path, md_path = report.write(directory, report_name, summary)
            print(f"\nPer-task test metrics ({json_path}):\n\n{md_path.read_text()}")
        return summary


def report_scalars(summary: dict) -> dict[str, float]:
    """A report summary's per-task metrics and per-layer NMI as logger scalars (NaN left out)."""
    scalars = {f"test/{task}/{k}": v for task, row in summary["tasks"].items() for k, v in row.items()}
    scalars.update({f"test_routing/{layer}/{k}": v[k] for layer, v in summary["routing"].items() for k in ("nmi", "nmi_shuffled")})
    return {k: v for k, v in scalars.items() if not math.isnan(v)}
