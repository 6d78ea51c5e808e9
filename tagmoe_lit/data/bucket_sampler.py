"""Which rows form each batch: every batch from one bucket, training draws indexed by batch number.

Training (`BucketSchedule.batch(g)`): batch g is drawn from `random.Random(f"{seed}/{g}")` alone:
a bucket with probability ∝ the total weight of its rows, then `batch_size` rows of that bucket
∝ their weight, with replacement. A batch thus depends only on (seed, g): the stream can start at
any global batch (exact resume, as SynthTAG's), ranks and DataLoader workers take disjoint batch
numbers, and the order is the same on every machine (Python's `random` is platform-independent).
Sampling with replacement is what makes per-manifest mixing weights exact and the draw indexable;
the price is that an "epoch" is not an exact pass over the data (each row is seen ≈ as often as its
weight says, not exactly once).

Evaluation (`eval_batches`): fixed batches, rows grouped by bucket in their given order.
"""

from __future__ import annotations

import itertools
import random
from typing import Iterator, Sequence

from torch.utils.data import Sampler


class BucketSchedule:
    """Weighted, per-bucket batch draws, addressable by global batch number."""

    def __init__(self, buckets: Sequence[tuple[int, int]], weights: Sequence[float], batch_size: int, seed: int):
        """
        Args:
            buckets: each row's bucket (index = row position in the training rows).
            weights: each row's sampling weight (> 0).
            batch_size: rows per batch.
            seed: seed of every draw.
        """
        if not buckets:
            raise ValueError("BucketSchedule needs at least one row.")
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(buckets):
            by_bucket.setdefault(tuple(b), []).append(i)
        self.sizes = sorted(by_bucket)
        self.rows = [by_bucket[s] for s in self.sizes]
        self.row_cum = [list(itertools.accumulate(weights[i] for i in rows)) for rows in self.rows]
        self.bucket_cum = list(itertools.accumulate(cum[-1] for cum in self.row_cum))
        self.batch_size, self.seed = batch_size, seed

    def batch(self, g: int) -> list[int]:
        """Row positions of global batch g (all in one bucket)."""
        rng = random.Random(f"{self.seed}/{g}")
        k = rng.choices(range(len(self.rows)), cum_weights=self.bucket_cum)[0]
        return rng.choices(self.rows[k], cum_weights=self.row_cum[k], k=self.batch_size)


def eval_batches(buckets: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Fixed batches of row positions: grouped by bucket (buckets in size order), rows in their order."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(buckets):
        by_bucket.setdefault(tuple(b), []).append(i)
    return [rows[s : s + batch_size] for size in sorted(by_bucket) for rows in [by_bucket[size]] for s in range(0, len(rows), batch_size)]


class FixedBatchSampler(Sampler[list[int]]):
    """A fixed list of batches as a batch sampler (Lightning's predict loop wraps batch samplers and
    needs an object, not a plain list)."""

    def __init__(self, batches: Sequence[Sequence[int]]):
        self.batches = [list(b) for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
