"""What the monitoring callbacks cost on a config's real `fit` (default experiments/base.yaml).

Runs the config once under Lightning's `SimpleProfiler`, which times every callback hook, and
prints each callback's total hook time next to the time spent in training batches
(`run_training_batch`: forward, backward, optimizer). Overhead = callback time / training time.
Both are measured in the same run, so the host's load shifts them alike. The module's own
routing record and validation are not callback costs and are not counted.

Usage: python benchmarks/callback_overhead.py [--config PATH] [any fit override …]
"""

from __future__ import annotations

import sys
from collections import defaultdict

from tagmoe_lit.cli import TagMoECLI

WATCHED = ("ExpertLoadMonitor", "SpecializationMonitor", "RoutingSignatureMonitor", "SampleGrid", "PredictionWriter")


def main(argv: list[str]) -> None:
    args = argv or ["--config", "experiments/base.yaml"]
    cli = TagMoECLI(args=["fit", *args, "--trainer.profiler", "simple", "--trainer.enable_progress_bar", "false"])
    durations = cli.trainer.profiler.recorded_durations
    training = sum(durations.get("run_training_batch", []))
    per_callback: dict[str, float] = defaultdict(float)
    for action, times in durations.items():
        for name in WATCHED:
            if action.startswith(f"[Callback]{name}."):
                per_callback[name] += sum(times)
    steps = len(durations.get("run_training_batch", []))
    print(f"\ntraining batches: {steps}, {training:.1f} s ({1000 * training / max(steps, 1):.0f} ms each)")
    for name, seconds in per_callback.items():
        print(f"{name:>24}: {seconds:7.2f} s  {100 * seconds / training:5.2f} %")
    total = sum(per_callback.values())
    print(f"{'all monitoring callbacks':>24}: {total:7.2f} s  {100 * total / training:5.2f} %  (target ≤ 2 %)")


if __name__ == "__main__":
    main(sys.argv[1:])
