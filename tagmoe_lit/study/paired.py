"""Paired differences between two variants: the seed is the unit, the samples only measure noise.

Two runs of the same seed are tested on the same samples with the same noise, so most of a
sample's difficulty cancels in the per-sample difference a_i − b_i, and each shared seed gives one
mean difference d_s (the mean of its per-sample differences). A claim about a *method* is a claim
about training runs, so the headline is the seed-level paired t-interval

    mean(d) ± t_{0.975, n−1} · sd(d) / √n        (n shared seeds, n ≥ 2; none for n = 1)

and the verdict words (better / worse / cannot tell apart) come from it alone (DESIGN.md pitfall 27).

The per-sample figures (mean ± SE over every sample of every shared seed, pooled as if independent)
stay as a secondary "test-sample noise" number: within a seed the differences share one trained
pair of models, so their SE says whether the sign would survive re-drawing the test set, not
re-training. Pooling 3 seeds × 288 samples as 864 independent differences made intervals far too
narrow for a claim about the method (issue 16).

The t quantile: scipy is not a dependency of the kit (torch's StudentT has no icdf), so
`t_quantile_975` reads an exact table for 1–30 degrees of freedom and, beyond, the Cornish–Fisher
expansion of t in 1/df (Abramowitz & Stegun 26.7.5; off by < 1e-7 for df > 30).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

Samples = Mapping[str, Sequence]  # a test report's `per_sample`: {"index": [...], "task": [...], metric: [...]}

# t_{0.975, df} for df = 1 … 30 (scipy.stats.t.ppf(0.975, df), 6 decimals).
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
_Z975 = 1.959963984540054  # the standard normal's 0.975 quantile: the limit df → ∞

BETTER, WORSE, CANNOT_TELL = "better", "worse", "cannot tell apart"


def t_quantile_975(df: int) -> float:
    """Student t's 0.975 quantile with `df` degrees of freedom (the half-width factor of a 95 % interval)."""
    if df < 1:
        raise ValueError(f"t_quantile_975: df = {df}; a t-interval needs df ≥ 1 (at least two seeds).")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = _Z975, float(df)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / v + g2 / v**2 + g3 / v**3 + g4 / v**4


@dataclass(frozen=True)
class Paired:
    """a − b on `metric`: per-seed mean differences (the unit of inference) and the pooled samples.

    `mean`, `se`, `n`, `low`, `high` and `significant` are the pooled per-sample figures: test-sample
    noise only, never a verdict. The verdict is `verdict(...)`, from `seed_interval`.
    """

    mean: float  # pooled over every shared sample of every shared seed
    se: float  # its per-sample standard error (test-sample noise)
    n: int  # pooled samples
    seed_means: tuple[float, ...]  # mean difference within each shared seed, in the order of `seeds`
    seeds: tuple[int, ...]  # the shared seeds that scored at least one sample

    # --- seed level: the headline -----------------------------------------------------------------

    @property
    def n_seeds(self) -> int:
        return len(self.seed_means)

    @property
    def seed_mean(self) -> float:
        """The mean over seeds of each seed's mean difference (every seed weighs the same)."""
        return sum(self.seed_means) / len(self.seed_means)

    @property
    def seed_interval(self) -> tuple[float, float] | None:
        """The 95 % paired t-interval over seeds (n − 1 df); None with one seed (no spread to measure).

        Seeds whose mean differences are identical give a zero-width interval: that is the
        t-interval's answer, and the reason to run more than two seeds.
        """
        if self.n_seeds < 2:
            return None
        mean, sd = mean_std(self.seed_means)
        half = t_quantile_975(self.n_seeds - 1) * sd / math.sqrt(self.n_seeds)
        return mean - half, mean + half

    def verdict(self, higher_better: bool) -> str:
        """'better' / 'worse' when the seed-level interval excludes 0 (in the metric's good direction
        for a), else 'cannot tell apart' (the interval spans 0, or a single seed gives none)."""
        interval = self.seed_interval
        if interval is None or interval[0] <= 0 <= interval[1]:
            return CANNOT_TELL
        return BETTER if (interval[0] > 0) == higher_better else WORSE

    # --- sample level: test-sample noise ----------------------------------------------------------

    @property
    def low(self) -> float:
        return self.mean - 1.96 * self.se

    @property
    def high(self) -> float:
        return self.mean + 1.96 * self.se

    @property
    def significant(self) -> bool:
        """The pooled per-sample 95 % interval excludes 0: the sign survives re-drawing the test set
        for these trained models. Not a claim about the method; see `verdict`."""
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
    """Per-seed mean differences over the seeds both variants ran, and the pooled per-sample
    differences; None if nothing is shared. A seed with no shared finite sample drops out."""
    pooled, seed_means, seeds = [], [], []
    for seed in sorted(set(a_by_seed) & set(b_by_seed)):
        d = differences(a_by_seed[seed], b_by_seed[seed], metric, tasks)
        if d:
            pooled += d
            seed_means.append(sum(d) / len(d))
            seeds.append(seed)
    if not pooled:
        return None
    mean, sd = mean_std(pooled)
    return Paired(mean, sd / math.sqrt(len(pooled)), len(pooled), tuple(seed_means), tuple(seeds))


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
