"""LoRA vs full fine-tuning on a config (default experiments/base.yaml): trainable parameters and step time.

Variants: full fine-tuning; LoRA on the experts only; LoRA on attention and experts (experiments/lora.yaml's
targets); each at rank 8. Runs are interleaved (full, experts, attention+experts, full, …) so machine drift hits
all alike; prints the trainable parameters, the median step time over the repeats' steps and its ratio to full
fine-tuning. Usage: python benchmarks/lora_step.py [--config PATH] [--steps N] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics

from train_step import timed_fit

VARIANTS = {
    "full fine-tuning": [],
    "LoRA r=8 on experts": ["--model.lora.rank", "8", "--model.lora.targets", "[experts]"],
    "LoRA r=8 on attention + experts": ["--model.lora.rank", "8", "--model.lora.targets", "[attention, experts]"],
}


def run(config: str, steps: int, extra: list[str]) -> tuple[int, int, list[float]]:
    cli, times = timed_fit(config, steps, extra)
    params = list(cli.model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params), times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="experiments/base.yaml")
    p.add_argument("--steps", type=int, default=23)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    counts: dict[str, tuple[int, int]] = {}
    for _ in range(args.repeats):
        for name, extra in VARIANTS.items():
            trainable, total, t = run(args.config, args.steps, extra)
            counts[name] = (trainable, total)
            times[name] += t
    full = statistics.median(times["full fine-tuning"])
    print("| variant | trainable / total parameters | median step | vs full |\n|---|---|---|---|")
    for name in VARIANTS:
        trainable, total = counts[name]
        step = statistics.median(times[name])
        print(f"| {name} | {trainable:,} / {total:,} ({trainable / total:.1%}) | {step * 1e3:.0f} ms | {step / full:.2f}× |")


if __name__ == "__main__":
    main()
