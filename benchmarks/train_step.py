"""Training-step cost on a config (default experiments/base.yaml): TAG-MoE vs dense, and data headroom.

Prints the median step time of the config and of its dense twin (`moe: null`, same active
parameters), their ratio, the training DataLoader's sample rate and how many times faster than
training consumes it the data arrives. Runs are interleaved (moe, dense, moe, dense, …) so machine
drift hits both alike. Usage: python benchmarks/train_step.py [--config PATH] [--steps N] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L

from tagmoe_lit.cli import TagMoECLI

QUIET = ["--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
         "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._t)


def timed_fit(config: str, steps: int, extra: list[str]) -> tuple[TagMoECLI, list[float]]:
    """Fit `steps` steps quietly; the CLI (its trained model) and the step times after warm-up."""
    cli = TagMoECLI(args=["--config", config, *QUIET, "--trainer.max_steps", str(steps), *extra], run=False)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli, timer.times[3:]  # skip warm-up steps


def step_times(config: str, steps: int, extra: list[str]) -> list[float]:
    return timed_fit(config, steps, extra)[1]


def data_rate(config: str, batches: int) -> tuple[float, int]:
    cli = TagMoECLI(args=["--config", config, *QUIET], run=False)
    loader = iter(cli.datamodule.train_dataloader())
    next(loader)
    t = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
    n = batches * batch["target"].shape[0]
    return n / (time.perf_counter() - t), batch["target"].shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="experiments/base.yaml")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    moe, dense = [], []
    for _ in range(args.repeats):
        moe += step_times(args.config, args.steps, [])
        dense += step_times(args.config, args.steps, ["--model.backbone.init_args.moe", "null"])
    m, d = statistics.median(moe), statistics.median(dense)
    rate, batch = data_rate(args.config, 20)
    consume = batch / m
    print(f"config {args.config}")
    print(f"TAG-MoE step   {m * 1000:8.1f} ms   (median of {len(moe)})")
    print(f"dense step     {d * 1000:8.1f} ms   (median of {len(dense)})")
    print(f"MoE / dense    {m / d:8.3f}")
    print(f"data           {rate:8.0f} samples/s   training consumes {consume:.0f} samples/s   headroom {rate / consume:.1f}x")


if __name__ == "__main__":
    main()
