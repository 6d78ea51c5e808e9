"""`ManifestDataModule`: your own editing / generation data from JSONL manifests.

Batches follow SynthTAG's contract exactly (see `datamodule.py`): `instruction` list[str];
`source`, `target` float [B, 3, H, W] in [0, 1] (`source` zeros where `has_source` is False);
`mask` bool [B, H, W] (all True unless the row gives a mask); `tags` multi-hot [B, V] under
`schema`; `task` long [B] indexing `task_names`; `index` long [B] (position in the module's rows).
H×W varies from batch to batch: each batch comes from one aspect-ratio bucket (`buckets.py`); the
source is fitted to its target's bucket.

Rows come from one or more manifests (`manifest.py`), mixed by `weights`: manifest m supplies a
share weight_m / Σ weights of the training draws, however many rows it has (default: every row
equally likely). Training batches are drawn by global batch number (`bucket_sampler.py`), so a run
resumed from a checkpoint continues with the batches a straight run would have seen, on any number
of ranks and workers. Validation is the rows whose split hash (`manifest.py`) falls below
`val_fraction` (stable across runs, seeds, reordering and annotation). `val_samples` keeps the
ones with the lowest hashes, so a capped validation set is drawn from every manifest in proportion
and grows by adding rows as the cap rises; the validation rows beyond the cap are unused (neither
trained on nor validated). Test is `test_manifests` or, without them, the (capped) validation rows.

Bad rows — invalid JSON, empty instruction, a missing or unreadable image, a tag outside the
schema, a row the annotator flagged — stop the run with "<file> line <n>: <problem>" by default.
With `on_bad_sample: skip` they are left out and counted in one warning per manifest; an image
that only fails when decoded during training is dropped from its batch with a warning (the batch
is then smaller; if a whole training batch is dropped the stream moves on, and a resumed run is
one batch off from a straight one). A bad row never becomes a wrong sample.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from tagmoe_lit.data.bucket_sampler import BucketSchedule, eval_batches
from tagmoe_lit.data.datamodule import global_batches, stream_position
from tagmoe_lit.data.buckets import aspect_buckets, nearest_bucket
from tagmoe_lit.data.images import ImageReadError, load_image, load_mask
from tagmoe_lit.data.manifest import ManifestError, ManifestRow, read_manifest
from tagmoe_lit.data.prompts import prompt_loader
from tagmoe_lit.data.tag_noise import check_rate, corrupt_tags
from tagmoe_lit.tags import TagSchema


class _RowLoader:
    """Row → sample dict (picklable for worker processes); None for an image that fails to decode when skipping."""

    def __init__(self, schema: TagSchema, task_names: Sequence[str], buckets: list[tuple[int, int]], skip: bool,
                 tag_noise: float = 0.0, seed: int = 0):
        self.schema, self.task_index, self.buckets = schema, {t: i for i, t in enumerate(task_names)}, buckets
        self.skip, self.tag_noise, self.seed = skip, tag_noise, seed
        self.skipped = 0

    def bucket(self, row: ManifestRow) -> tuple[int, int]:
        return nearest_bucket(*row.size, self.buckets)

    def __call__(self, row: ManifestRow, index: int) -> dict | None:
        size = self.bucket(row)
        try:
            target = load_image(row.target, size)
            source = load_image(row.source, size) if row.source is not None else torch.zeros_like(target)
            mask = load_mask(row.mask, size) if row.mask is not None else torch.ones(size, dtype=torch.bool)
        except ImageReadError as err:
            message = f"{row.where}: an image of this row {err}"
            if not self.skip:
                raise ManifestError(f"{message}; fix or remove the row, or set data.on_bad_sample: skip.") from None
            self.skipped += 1
            warnings.warn(f"{message}; dropped from its batch ({self.skipped} dropped so far in this process).", stacklevel=2)
            return None
        ids = corrupt_tags(row.tag_ids, self.schema, self.tag_noise, self.seed, index) if self.tag_noise else row.tag_ids
        return {
            "instruction": row.instruction,
            "source": source,
            "has_source": row.source is not None,
            "target": target,
            "mask": mask,
            "tags": self.schema.multi_hot(ids),
            "task": self.task_index[row.task],
            "index": index,
        }


def _collate(samples: list[dict | None], what: str) -> dict:
    kept = [s for s in samples if s is not None]
    if not kept:
        raise ManifestError(f"Every image of {what} failed to decode (see the warnings above); fix or remove those rows.")
    return default_collate(kept)


class ManifestStream(IterableDataset):
    """Endless training stream of whole batches; batch b on rank r of W is global batch b·W + r."""

    def __init__(self, rows: Sequence[ManifestRow], indices: Sequence[int], load: _RowLoader, schedule: BucketSchedule,
                 start_batch: int = 0, rank: int = 0, world_size: int = 1):
        self.rows, self.indices, self.load, self.schedule = rows, indices, load, schedule
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size

    def __iter__(self) -> Iterator[dict]:
        for g in global_batches(self.start_batch, self.rank, self.world_size):
            batch = [self.load(self.rows[p], self.indices[p]) for p in self.schedule.batch(g)]
            if any(s is not None for s in batch):  # a batch whose every row was dropped is skipped
                yield _collate(batch, "a training batch")


class ManifestBatches(Dataset):
    """Fixed batches (validation / test): item k is the collated batch k."""

    def __init__(self, rows: Sequence[ManifestRow], indices: Sequence[int], load: _RowLoader, batch_size: int):
        self.rows, self.indices, self.load = rows, indices, load
        self.batches = eval_batches([load.bucket(r) for r in rows], batch_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict:
        return _collate([self.load(self.rows[p], self.indices[p]) for p in self.batches[k]], f"evaluation batch {k}")


@dataclass(frozen=True)
class ManifestSplit:
    """Positions in `ManifestDataModule.rows` of each split, and the training rows' sampling weights."""

    train: list[int]
    train_weights: list[float]
    val: list[int]
    test: list[int]


class ManifestDataModule(L.LightningDataModule):
    """Image-editing / generation samples listed in JSONL manifests, batched by aspect-ratio bucket."""

    def __init__(
        self,
        manifests: list[str],
        weights: list[float] | None = None,
        schema: str = "synthtag",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        max_area: int = 512 * 512,
        max_aspect: float = 2.0,
        bucket_multiple: int = 16,
        val_fraction: float = 0.05,
        val_samples: int | None = None,
        test_manifests: list[str] | None = None,
        predict_file: str | None = None,
        on_bad_sample: Literal["error", "skip"] = "error",
        require_tags: bool = True,
        tag_noise: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
    ):
        """
        Args:
            manifests: JSONL manifest paths (one sample per line; image paths relative to each manifest's folder).
            weights: share of training draws per manifest (default: proportional to its number of rows).
            schema: tag schema name or YAML path; the model is built for the same schema.
            batch_size: training samples per batch and per rank.
            eval_batch_size: batch size for validation / test / predict (default: `batch_size`).
            max_area: most pixels per image; buckets are the widest sizes within it per height.
            max_aspect: most extreme aspect ratio of a bucket (longer side / shorter side).
            bucket_multiple: bucket sides are multiples of this (16 for Qwen-Image's VAE and 2×2 packing).
            val_fraction: fraction of rows (by a stable hash of instruction and target path) kept for validation.
            val_samples: use at most this many validation rows, those of lowest hash (default: all); the rest are unused.
            test_manifests: manifests for `test` (default: the validation rows).
            predict_file: a prompt list (JSONL or YAML) for `predict` (default: the test rows).
            on_bad_sample: `error` stops at the first bad row naming file and line; `skip` leaves bad rows out with a warning.
            require_tags: rows without tags are bad rows; false trains them with all-zero tags (no alignment signal).
            tag_noise: fraction of training samples whose tags get one tag swapped within its level (seeded by row).
            seed: seed of the training draws and of the tag noise.
            num_workers: DataLoader workers (each produces whole batches).
        """
        super().__init__()
        if isinstance(manifests, str) or not manifests:
            raise ValueError(f"manifests must be a non-empty list of JSONL paths, got {manifests!r}.")
        if weights is not None and (len(weights) != len(manifests) or any(w <= 0 for w in weights)):
            raise ValueError(f"weights {weights} must give one positive number per manifest ({len(manifests)} manifests).")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if val_samples is not None and val_samples < 0:
            raise ValueError(f"val_samples must be at least 0 (or null for all validation rows), got {val_samples}.")
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}.")
        self.manifests, self.weights = list(manifests), list(weights) if weights is not None else None
        self.schema = TagSchema.load(schema)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.buckets = aspect_buckets(max_area, bucket_multiple, max_aspect)
        self.max_area, self.bucket_multiple, self.max_aspect = max_area, bucket_multiple, max_aspect
        self.val_fraction, self.val_samples = val_fraction, val_samples
        self.test_manifests, self.predict_file = list(test_manifests or []), predict_file
        self.on_bad_sample, self.require_tags = on_bad_sample, require_tags
        self.tag_noise = check_rate(tag_noise)
        self.seed, self.num_workers = seed, num_workers
        self._rows: list[ManifestRow] | None = None

    # -- reading --------------------------------------------------------------------------------
    def _read(self, path: str) -> list[ManifestRow]:
        rows, bad = read_manifest(path, self.schema, self.require_tags)
        if bad and self.on_bad_sample == "error":
            raise ManifestError(f"{bad[0]}; fix or remove the row, or set data.on_bad_sample: skip to leave bad rows out.")
        if bad:
            warnings.warn(f"Skipped {len(bad)} bad rows of {len(rows) + len(bad)} in {path} (first: {bad[0]}).", stacklevel=3)
        return rows

    def _load(self) -> None:
        """Read and check every manifest once; split rows; name tasks."""
        if self._rows is not None:
            return
        per_manifest = [self._read(p) for p in self.manifests]
        test = [r for p in self.test_manifests for r in self._read(p)]
        rows = [r for rs in per_manifest for r in rs] + test
        train, val, weights = [], [], []
        offset = 0
        for m, rs in enumerate(per_manifest):
            kept = [offset + i for i, r in enumerate(rs) if r.split_hash >= self.val_fraction]
            val += [offset + i for i, r in enumerate(rs) if r.split_hash < self.val_fraction]
            share = self.weights[m] / len(kept) if self.weights is not None and kept else 1.0
            weights += [share] * len(kept)
            train += kept
            offset += len(rs)
        if not train:
            raise ManifestError(
                f"No training rows in {self.manifests} ({len(val)} good rows, all in validation); "
                "add rows, fix the bad ones or lower val_fraction."
            )
        if self.val_fraction > 0 and not val:
            warnings.warn(
                f"No row of {self.manifests} falls in validation (val_fraction={self.val_fraction}); validation is empty.", stacklevel=2
            )
        self._task_names = tuple(sorted({r.task for r in rows}))
        if self.val_samples is not None:  # the lowest hashes: a share of every manifest, not the first manifest's rows
            val = sorted(sorted(val, key=lambda i: rows[i].split_hash)[: self.val_samples])
        test = list(range(offset, len(rows))) if self.test_manifests else val
        self._split = ManifestSplit(train, weights, val, test)
        self._rows = rows

    @property
    def rows(self) -> list[ManifestRow]:
        """Every good row: the manifests' rows in order, then the test manifests' (`index` = position here)."""
        self._load()
        return self._rows  # type: ignore[return-value]

    @property
    def split(self) -> ManifestSplit:
        self._load()
        return self._split

    @property
    def task_names(self) -> tuple[str, ...]:
        """Task names in sorted order; a batch's `task` indexes this (see `manifest.py` for how rows get a task)."""
        self._load()
        return self._task_names

    def setup(self, stage: str | None = None) -> None:
        self._load()

    # -- loaders ---------------------------------------------------------------------------------
    def row_loader(self, train: bool) -> _RowLoader:
        """Row → sample dict as the loaders produce it (`train`: with tag noise)."""
        noise = self.tag_noise if train else 0.0
        return _RowLoader(self.schema, self.task_names, self.buckets, self.on_bad_sample == "skip", noise, self.seed)

    def _fixed(self, indices: list[int]) -> DataLoader:
        rows = [self.rows[i] for i in indices]
        batches = ManifestBatches(rows, indices, self.row_loader(train=False), self.eval_batch_size)
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        start, rank, world = stream_position(self.trainer)
        split, load = self.split, self.row_loader(train=True)
        rows = [self.rows[i] for i in split.train]
        schedule = BucketSchedule([load.bucket(r) for r in rows], split.train_weights, self.batch_size, self.seed)
        stream = ManifestStream(rows, split.train, load, schedule, start, rank, world)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._fixed(self.split.val)

    def test_dataloader(self) -> DataLoader:
        return self._fixed(self.split.test)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_file is not None:
            side = math.isqrt(self.max_area) // self.bucket_multiple * self.bucket_multiple
            return prompt_loader(
                self.predict_file, side, self.schema, self.eval_batch_size, self.num_workers,
                multiple=self.bucket_multiple, max_aspect=self.max_aspect,
            )
        return self.test_dataloader()
