"""Annotation noise for robustness studies: corrupt a fraction of samples' tags, reproducibly.

The paper leaves open how much annotation noise TAG-MoE tolerates. `corrupt_tags` models the
commonest annotator mistake, a wrong tag within the right level: with probability `rate` a sample
has one of its tags (chosen uniformly) replaced by another tag of the same level that the sample
does not already carry. The draw depends only on (seed, index), so a sample is corrupted the same
way in every epoch, on every rank and worker, and after a resume — like a wrong label in a dataset,
not fresh noise each step. Data modules apply it to training samples only; validation keeps the
true tags so metrics stay comparable across noise levels.
"""

from __future__ import annotations

import random
from typing import Sequence

from tagmoe_lit.tags import TagSchema


def check_rate(rate: float) -> float:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"tag_noise must be a fraction of samples in [0, 1]; got {rate}.")
    return float(rate)


def corrupt_tags(ids: Sequence[int], schema: TagSchema, rate: float, seed: int, index: int) -> list[int]:
    """`ids` with one tag swapped for another of its level, for a `rate` fraction of (seed, index); else unchanged."""
    ids = list(ids)
    if rate <= 0.0 or not ids:
        return ids
    rng = random.Random(f"tag_noise/{seed}/{index}")
    if rng.random() >= rate:
        return ids
    present = set(ids)
    level_ids = {level: sorted(tags.values()) for level, tags in schema.levels.items()}
    level_of = {i: level for level, members in level_ids.items() for i in members}
    swappable = [i for i in ids if any(j not in present for j in level_ids[level_of[i]])]
    if not swappable:  # every tag's level is fully used (e.g. one-tag levels): nothing to swap
        return ids
    old = rng.choice(swappable)
    new = rng.choice([j for j in level_ids[level_of[old]] if j not in present])
    return [new if i == old else i for i in ids]
