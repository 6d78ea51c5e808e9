"""Paired differences between two variants, sample by sample, and spreads over seeds.

Why paired: two runs of the same seed are tested on the same samples with the same noise, so
most of a sample's difficulty cancels in the per-sample difference a_i − b_i. Its mean ± standard
error (over every sample of every shared seed) is far tighter than comparing two means, and a 95 %
interval (mean ± 1.96·SE) that excludes 0 says the sign would survive re-drawing the test set.
What it does not cover is training noise: that is what the per-seed means and their spread (and a
sign agreed by every seed) show next to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

Samples = Mapping[str, Sequence]  # a test report's `per_sample`: {"index": [...], "task": [...], metric: [...]}


@dataclass(frozen=True)
class Paired:
    """a − b on `metric` over the samples of `tasks` that both runs scored (NaN: not defined there)."""

    mean: float
    se: float
    n: int
    seed_means: tuple[float, ...]  # mean difference within each shared seed

    @property
    def low(self) -> float:
        return self.mean - 1.96 * self.se

    @property
    def high(self) -> float:
        return self.mean + 1.96 * self.se

    @property
    def significant(self) -> bool:
        """The 95 % interval excludes 0."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    @property
    def seeds_agree(self) -> bool:
        """Every seed's mean difference has the sign of the overall mean."""
        return all(math.copysign(1, m) == math.copysign(1, self.mean) for m in self.seed_means) and self.mean != 0


def differences(a: Samples, b: Samples, metric: str, tasks: set[str] | None = None) -> list[float]:
    """a − b per sample id present (and finite) in both, restricted to `tasks` (None: all)."""
    b_by_id = {i: v for i, v in zip(b["index"], b[metric])}
    out = []
    for i, task, v in zip(a["index"], a["task"], a[metric]):
        w = b_by_id.get(i)
        if (tasks is None or task in tasks) and _finite(v) and _finite(w):
            out.append(v - w)
    return out


def paired(a_by_seed: Mapping[int, Samples], b_by_seed: Mapping[int, Samples], metric: str, tasks: set[str] | None = None) -> Paired | None:
    """Pool per-sample differences over the seeds both variants ran; None if nothing is shared."""
    pooled, seed_means = [], []
    for seed in sorted(set(a_by_seed) & set(b_by_seed)):
        d = differences(a_by_seed[seed], b_by_seed[seed], metric, tasks)
        if d:
            pooled += d
            seed_means.append(sum(d) / len(d))
    if not pooled:
        return None
    mean, sd = mean_std(pooled)
    return Paired(mean, sd / math.sqrt(len(pooled)), len(pooled), tuple(seed_means))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs are left out."""
    values = [v for v in values if _finite(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))
