"""`TaskReport`: per-task evaluation results, gathered batch by batch, written as JSON and markdown.

Evaluation produces per-sample numbers (flow loss at fixed noise, edit success, PSNR/SSIM …) and
per-sample top-1 expert counts per MoE layer. The report averages the numbers per task (NaN — an
empty region — is left out of a mean), adds an `all` row over every sample, and turns the top-1
counts into the task–expert NMI per layer beside its shuffled-label baseline. It holds no model
state, so `test`, the expert-knockout analysis and the ablation study all write the same files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from tagmoe_lit.io import atomic_write_text
from tagmoe_lit.metrics.specialization import nmi, shuffled_nmi, task_expert_table


class TaskReport:
    """Accumulates per-sample metrics and routing by task; `summary()` gives the tables."""

    def __init__(self, task_names: Sequence[str] | None = None):
        """`task_names[i]` names task id i (default: the id itself)."""
        self.task_names = list(task_names) if task_names is not None else None
        self._tasks: list[torch.Tensor] = []
        self._values: dict[str, list[torch.Tensor]] = {}
        self._top1: list[list[torch.Tensor]] = []
        self._index: list[torch.Tensor] = []

    def add(
        self,
        task_B: torch.Tensor,
        metrics: dict[str, torch.Tensor],
        top1_counts_LBE: Sequence[torch.Tensor] = (),
        index_B: torch.Tensor | None = None,
    ) -> None:
        """One batch: task ids [B], per-sample metrics {name: [B]}, per-layer top-1 counts [B, E].

        With sample ids `index_B`, a sample seen twice (a distributed sampler pads the last batches
        by repeating samples) counts once.
        """
        if self._values and set(metrics) != set(self._values):
            raise ValueError(f"Metric names changed between batches: {sorted(self._values)} then {sorted(metrics)}.")
        if index_B is not None:
            self._index.append(index_B.detach().cpu())
        self._tasks.append(task_B.detach().cpu())
        for name, v in metrics.items():
            self._values.setdefault(name, []).append(v.detach().float().cpu())
        if top1_counts_LBE:
            self._top1.append([c.detach().cpu() for c in top1_counts_LBE])

    @classmethod
    def merge(cls, reports: Sequence["TaskReport"]) -> "TaskReport":
        """One report holding every sample of `reports` (e.g. one per data-parallel rank)."""
        merged = cls(reports[0].task_names)
        for report in reports:
            merged._tasks += report._tasks
            merged._top1 += report._top1
            merged._index += report._index
            for name, values in report._values.items():
                merged._values.setdefault(name, []).extend(values)
        return merged

    def summary(self) -> dict:
        """{'tasks': {task: {metric: mean}}, 'all': {...}, 'samples': {task: n}, 'routing': {layer: {...}},
        'per_sample': {'index': [...], 'task': [...], metric: [...]}}.

        `per_sample` keeps every sample's numbers (in first-seen order, ids from `add(index_B=…)`,
        else positions) so that two runs on the same samples can be compared sample by sample
        (the ablation study's paired differences).
        """
        if not self._tasks:
            raise ValueError("TaskReport is empty: no evaluation batch was added.")
        tasks_N = torch.cat(self._tasks)
        index_N = torch.cat(self._index) if len(self._index) == len(self._tasks) else torch.arange(len(tasks_N))
        keep = _first_occurrences(index_N)  # positions are distinct: without ids every sample is kept
        task_B, index_N = tasks_N[keep], index_N[keep]
        names = self.task_names or [str(i) for i in range(int(task_B.max()) + 1)]
        values = {k: torch.cat(v)[keep] for k, v in self._values.items()}
        out: dict = {"tasks": {}, "samples": {}, "all": {k: _nanmean(v) for k, v in values.items()}, "routing": {}}
        out["per_sample"] = {"index": index_N.tolist(), "task": [names[t] for t in task_B.tolist()]}
        out["per_sample"].update({k: v.tolist() for k, v in values.items()})
        for t in sorted(task_B.unique().tolist()):
            rows = task_B == t
            name = names[t]
            out["samples"][name] = int(rows.sum())
            out["tasks"][name] = {k: _nanmean(v[rows]) for k, v in values.items()}
        for i in range(len(self._top1[0]) if self._top1 else 0):
            top1_BE = torch.cat([batch[i] for batch in self._top1])[keep]
            table = task_expert_table(task_B, top1_BE, len(names))
            out["routing"][f"layer_{i}"] = {
                "nmi": nmi(table),
                "nmi_shuffled": shuffled_nmi(task_B, top1_BE, len(names)),
                "task_expert_share": (table / table.sum(1, keepdim=True).clamp_min(1)).tolist(),
            }
        return out

    def write(self, directory: str | Path, stem: str = "test_report", summary: dict | None = None) -> tuple[Path, Path]:
        """Write `{stem}.json` and `{stem}.md` atomically (temp file + rename); return their paths."""
        summary = summary or self.summary()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = directory / f"{stem}.json", directory / f"{stem}.md"
        atomic_write_text(paths[0], json.dumps(json_safe(summary), indent=2, allow_nan=False))
        atomic_write_text(paths[1], to_markdown(summary))
        return paths


def to_markdown(summary: dict) -> str:
    """The per-task table, then NMI per layer, as GitHub markdown."""
    metrics = list(summary["all"])
    lines = ["| task | n | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    rows = [*summary["tasks"].items(), ("all", summary["all"])]
    for name, values in rows:
        n = summary["samples"].get(name, sum(summary["samples"].values()))
        lines.append(f"| {name} | {n} | " + " | ".join(_fmt(values[m]) for m in metrics) + " |")
    if summary["routing"]:
        lines += ["", "| layer | NMI(task; top-1 expert) | shuffled-task NMI |", "|---|---|---|"]
        lines += [f"| {k} | {v['nmi']:.3f} | {v['nmi_shuffled']:.3f} |" for k, v in summary["routing"].items()]
    return "\n".join(lines) + "\n"


def json_safe(value):
    """`value` with NaN floats as None, so strict JSON readers (jq, browsers) accept the file."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _first_occurrences(index_N: torch.Tensor) -> torch.Tensor:
    """Bool [N]: True at the first position of each distinct sample id."""
    seen: set[int] = set()
    keep = []
    for i in index_N.tolist():
        keep.append(i not in seen)
        seen.add(i)
    return torch.tensor(keep, dtype=torch.bool)


def _nanmean(v: torch.Tensor) -> float:
    v = v[~v.isnan()]
    return float(v.mean()) if v.numel() else math.nan


def _fmt(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.3f}"
