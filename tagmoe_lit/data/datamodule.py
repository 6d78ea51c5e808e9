"""SynthTAG as a LightningDataModule, with a training stream that resumes exactly.

Training reads an endless, stateless stream: batch b on rank r of W holds samples
`(b·W + r)·B … (b·W + r)·B + B − 1` of the generator, and the stream starts at the batch matching
the trainer's global step. Restarting from a checkpoint therefore continues with exactly the batches
a straight run would have seen (Lightning restores neither a dataset's position nor RNG states,
DESIGN.md pitfalls 14 and 22), for any number of DataLoader workers.

Validation and test use fixed samples drawn with their own seeds, over *all* tasks, so tasks held
out of training (`holdout_tasks`) are evaluated on exactly the same footing.

A batch is a dict: `instruction` list[str]; `source`, `target` float [B, 3, H, W] in [0, 1]
(`source` is zeros where `has_source` is False: text-to-image); `mask` bool [B, H, W];
`tags` float multi-hot [B, V]; `task` long [B] (index into `task_names`); `index` long [B].
`ManifestDataModule` (real data) produces the same dict.

`tag_noise` corrupts that fraction of *training* samples' tags (`tag_noise.py`); `predict_file`
makes `predict` read a prompt list (`prompts.py`) instead of the test split.
"""

from __future__ import annotations

from typing import Iterator, Literal, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from tagmoe_lit.data.prompts import prompt_loader
from tagmoe_lit.data.synthtag import TASK_TAGS, TASKS, SynthSample, SynthTAG
from tagmoe_lit.data.tag_noise import check_rate, corrupt_tags
from tagmoe_lit.tags import TagSchema

VAL_SEED_OFFSET, TEST_SEED_OFFSET = 1_000_003, 2_000_003


class _Encoder:
    """SynthSample → dict of tensors under a tag schema (picklable for worker processes).

    `flat`: a sample's only tag is its task's name (the ablation's flat-tag variant), instead of
    its Scope / Type / Preservation tags.
    """

    def __init__(self, schema: TagSchema, task_names: Sequence[str], tag_noise: float = 0.0, seed: int = 0, flat: bool = False):
        self.schema, self.task_index = schema, {t: i for i, t in enumerate(task_names)}
        self.tag_noise, self.seed, self.flat = tag_noise, seed, flat

    def __call__(self, s: SynthSample, index: int) -> dict:
        target = s.target.float() / 255.0
        ids = self.schema.encode([s.task] if self.flat else s.tags)
        if self.tag_noise:
            ids = corrupt_tags(ids, self.schema, self.tag_noise, self.seed, index)
        return {
            "instruction": s.instruction,
            "source": s.source.float() / 255.0 if s.source is not None else torch.zeros_like(target),
            "has_source": s.source is not None,
            "target": target,
            "mask": s.mask,
            "tags": self.schema.multi_hot(ids),
            "task": self.task_index[s.task],
            "index": index,
        }


def stream_position(trainer: L.Trainer | None) -> tuple[int, int, int]:
    """(first local batch, rank, world size) of a training stream: where the restored global step left off."""
    if trainer is None:
        return 0, 0, 1
    return trainer.global_step * trainer.accumulate_grad_batches, trainer.global_rank, trainer.world_size


def global_batches(start_batch: int, rank: int, world_size: int) -> Iterator[int]:
    """Global batch numbers this rank's DataLoader worker produces: b·W + r for b = start, start + 1, …

    Workers take every `num_workers`-th b, as the DataLoader collects batches from them round-robin.
    """
    info = get_worker_info()
    b, workers = start_batch + (info.id if info else 0), info.num_workers if info else 1
    while True:
        yield b * world_size + rank
        b += workers


class SynthTAGStream(IterableDataset):
    """Endless training stream indexed by global batch number (see module doc)."""

    def __init__(self, synth: SynthTAG, encode: _Encoder, batch_size: int, start_batch: int = 0, rank: int = 0, world_size: int = 1):
        self.synth, self.encode, self.batch_size = synth, encode, batch_size
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size

    def __iter__(self) -> Iterator[dict]:
        for g in global_batches(self.start_batch, self.rank, self.world_size):
            for i in range(g * self.batch_size, (g + 1) * self.batch_size):
                yield self.encode(self.synth.sample(i), i)


class SynthTAGSplit(Dataset):
    """A fixed, finite split (validation / test)."""

    def __init__(self, synth: SynthTAG, encode: _Encoder, size: int):
        self.synth, self.encode, self.size = synth, encode, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return self.encode(self.synth.sample(i), i)


class SynthTAGDataModule(L.LightningDataModule):
    """The embedded default data: procedurally generated editing + generation tasks with exact targets."""

    exact_targets = True  # targets and masks are exact: `test` may score sampled edits against them

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 32,
        seed: int = 0,
        tasks: list[str] | None = None,
        holdout_tasks: list[str] | None = None,
        val_samples: int = 288,
        test_samples: int = 576,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        schema: str = "synthtag",
        tag_noise: float = 0.0,
        tag_granularity: Literal["hierarchical", "flat"] = "hierarchical",
        predict_file: str | None = None,
    ):
        """
        Args:
            image_size: side of the square images in pixels (multiple of 8).
            batch_size: training samples per batch and per rank.
            seed: generator seed; the same seed gives the same samples on any machine.
            tasks: tasks to use (default: all of `tagmoe_lit.data.synthtag.TASKS`; the interference dial's
                tasks, `interference.CONFLICT_LEVELS`, need `schema: interference`).
            holdout_tasks: tasks left out of training but kept in validation and test.
            val_samples: size of the fixed validation split (spread evenly over the tasks).
            test_samples: size of the fixed test split.
            eval_batch_size: batch size for validation / test (default: `batch_size`).
            num_workers: DataLoader workers (0: generate in the training process, fastest on 2 cores).
            schema: tag schema name or YAML path; the model is built for the same schema.
            tag_noise: fraction of training samples whose tags get one tag swapped within its level (seeded by index).
            tag_granularity: hierarchical (each task's Scope / Type / Preservation tags, `TASK_TAGS`) or
                flat (one tag per task, named after it: needs a schema such as `synthtag_flat`).
            predict_file: a prompt list (JSONL or YAML) for `predict` (default: the test split).
        """
        super().__init__()
        self.task_names = tuple(tasks) if tasks else TASKS
        holdout = list(holdout_tasks or [])
        unknown = [t for t in [*self.task_names, *holdout] if t not in TASK_TAGS]
        if unknown:
            raise ValueError(f"Unknown SynthTAG task(s) {unknown}; valid tasks: {list(TASK_TAGS)}.")
        self.train_tasks = tuple(t for t in self.task_names if t not in holdout)
        if not self.train_tasks:
            raise ValueError(f"holdout_tasks={holdout} leaves no task to train on; keep at least one of {list(self.task_names)}.")
        self.image_size, self.batch_size, self.seed = image_size, batch_size, seed
        self.holdout_tasks = tuple(holdout)
        self.val_samples, self.test_samples = val_samples, test_samples
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.schema = TagSchema.load(schema)
        if tag_granularity not in ("hierarchical", "flat"):
            raise ValueError(f"tag_granularity='{tag_granularity}' is unknown; choose 'hierarchical' or 'flat'.")
        flat = tag_granularity == "flat"
        missing = [t for t in self.task_names if t not in self.schema.names] if flat else []
        if missing:
            raise ValueError(f"tag_granularity: flat tags each sample with its task's name, but schema {self.schema.name} "
                             f"has no tag {missing}; use data.schema: synthtag_flat (or a schema listing every task).")
        self.encode = _Encoder(self.schema, self.task_names, flat=flat)
        self.tag_noise, self.predict_file = check_rate(tag_noise), predict_file
        self.train_encode = _Encoder(self.schema, self.task_names, self.tag_noise, seed, flat) if self.tag_noise else self.encode

    def _synth(self, seed: int, tasks: Sequence[str]) -> SynthTAG:
        return SynthTAG(image_size=self.image_size, seed=seed, tasks=tasks)

    def train_synth(self) -> SynthTAG:
        """The training samples' generator: what `train_dataloader` streams, before rank slicing."""
        return self._synth(self.seed, self.train_tasks)

    def _loader(self, dataset, batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        start, rank, world = stream_position(self.trainer)
        stream = SynthTAGStream(self.train_synth(), self.train_encode, self.batch_size, start, rank, world)
        return self._loader(stream, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        split = SynthTAGSplit(self._synth(self.seed + VAL_SEED_OFFSET, self.task_names), self.encode, self.val_samples)
        return self._loader(split, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        split = SynthTAGSplit(self._synth(self.seed + TEST_SEED_OFFSET, self.task_names), self.encode, self.test_samples)
        return self._loader(split, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_file is not None:
            return prompt_loader(self.predict_file, self.image_size, self.schema, self.eval_batch_size, self.num_workers)
        return self.test_dataloader()
