"""The expert-knockout table: per task, a metric with all experts and its change per knocked-out expert.

`tagmoe_lit/knockout.py` runs the knockout (one `test` per configuration) and writes this table
beside the checkpoint; the study report (`study/report.py`) prints it from a run's `knockout.json`.
Plain formatting over `TaskReport` summaries: no model, no Lightning.
"""

from __future__ import annotations

import math


def to_markdown(results: dict, metric: str) -> str:
    """Task × configuration table of one metric: the full model's value, then each knockout's change."""
    base = results["all_experts"]["tasks"]
    knocked = [k for k in results if k != "all_experts"]
    lines = [f"| task | {metric} (all experts) | " + " | ".join(f"Δ {k}" for k in knocked) + " |", "|---" * (len(knocked) + 2) + "|"]
    for task, row in base.items():
        deltas = [results[k]["tasks"][task][metric] - row[metric] for k in knocked]
        lines.append(f"| {task} | {row[metric]:.3f} | " + " | ".join("–" if math.isnan(d) else f"{d:+.3f}" for d in deltas) + " |")
    return "\n".join(lines) + "\n"
