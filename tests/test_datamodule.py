"""The SynthTAG DataModule: resumable stream layout, worker-independence, holdout, batch format."""

import pytest
import torch
from torch.utils.data import DataLoader

from tagmoe_lit.data import TASKS, SynthTAGDataModule
from tagmoe_lit.data.datamodule import SynthTAGStream


def _indices(loader, n_batches: int) -> list[list[int]]:
    it = iter(loader)
    return [next(it)["index"].tolist() for _ in range(n_batches)]


def test_stream_starts_at_the_restored_step_and_splits_ranks_without_overlap():
    dm = SynthTAGDataModule(batch_size=3)
    synth = dm.train_synth()
    full = _indices(DataLoader(SynthTAGStream(synth, dm.encode, 3), batch_size=3), 4)
    later = _indices(DataLoader(SynthTAGStream(synth, dm.encode, 3, start_batch=2), batch_size=3), 2)
    assert later == full[2:4]
    r0 = _indices(DataLoader(SynthTAGStream(synth, dm.encode, 3, rank=0, world_size=2), batch_size=3), 2)
    r1 = _indices(DataLoader(SynthTAGStream(synth, dm.encode, 3, rank=1, world_size=2), batch_size=3), 2)
    assert r0 == [[0, 1, 2], [6, 7, 8]] and r1 == [[3, 4, 5], [9, 10, 11]]


def test_worker_count_does_not_change_the_batches():
    dm = SynthTAGDataModule(batch_size=2)
    synth = dm.train_synth()
    single = _indices(DataLoader(SynthTAGStream(synth, dm.encode, 2), batch_size=2), 5)
    multi = _indices(DataLoader(SynthTAGStream(synth, dm.encode, 2), batch_size=2, num_workers=2), 5)
    assert single == multi


def test_batch_format_and_holdout():
    dm = SynthTAGDataModule(batch_size=len(TASKS), holdout_tasks=["move"], val_samples=len(TASKS))
    train = next(iter(dm.train_dataloader()))
    names = [dm.task_names[t] for t in train["task"].tolist()]
    assert "move" not in names
    val_names = {dm.task_names[t] for t in next(iter(dm.val_dataloader()))["task"].tolist()}
    assert "move" in val_names
    assert train["target"].shape == (len(TASKS), 3, 32, 32) and train["target"].dtype == torch.float32
    assert train["tags"].shape == (len(TASKS), dm.schema.num_tags) and (train["tags"].sum(1) >= 1).all()
    generate = train["task"] == dm.task_names.index("generate")
    assert not train["has_source"][generate].any() and train["source"][generate].abs().sum() == 0
    assert isinstance(train["instruction"], list) and all(train["instruction"])


def test_bad_task_names_are_rejected():
    with pytest.raises(ValueError, match=r"Unknown SynthTAG task\(s\) \['mvoe'\]; valid tasks"):
        SynthTAGDataModule(holdout_tasks=["mvoe"])
    with pytest.raises(ValueError, match="leaves no task to train on"):
        SynthTAGDataModule(tasks=["add"], holdout_tasks=["add"])


def test_flat_tags_give_each_task_its_own_single_tag():
    flat = SynthTAGDataModule(schema="synthtag_flat", tag_granularity="flat", val_samples=18)
    batch = next(iter(DataLoader(flat.val_dataloader().dataset, batch_size=18)))
    assert torch.equal(batch["tags"].sum(1), torch.ones(18))
    names = [flat.schema.names[i] for i in batch["tags"].argmax(1).tolist()]
    assert names == [flat.task_names[t] for t in batch["task"].tolist()]
    with pytest.raises(ValueError, match="schema synthtag has no tag .*use data.schema: synthtag_flat"):
        SynthTAGDataModule(tag_granularity="flat")
