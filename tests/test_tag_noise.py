"""Noisy tags: a seeded fraction of training samples get one tag swapped within its level."""

from collections import Counter

import pytest
import torch

from manifest_helpers import square_manifest
from tagmoe_lit.data import ManifestDataModule, SynthTAGDataModule
from tagmoe_lit.data.tag_noise import corrupt_tags
from tagmoe_lit.tags import TagSchema

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
SCHEMA = TagSchema.load("synthtag")
RECOLOR = SCHEMA.encode(["local editing", "attribute editing", "background preservation"])


def test_corruption_rate_level_and_determinism():
    outs = [corrupt_tags(RECOLOR, SCHEMA, 0.3, seed=0, index=i) for i in range(3000)]
    changed = [o for o in outs if o != RECOLOR]
    assert len(changed) / 3000 == pytest.approx(0.3, abs=0.03)
    level = {i: SCHEMA.level_of(SCHEMA.names[i]) for i in range(SCHEMA.num_tags)}
    for o in changed:
        assert len(o) == len(set(o)) == 3 and len(set(o) - set(RECOLOR)) == 1
        assert sorted(level[i] for i in o) == sorted(level[i] for i in RECOLOR)  # swapped within its level
    assert outs == [corrupt_tags(RECOLOR, SCHEMA, 0.3, seed=0, index=i) for i in range(3000)]
    assert outs != [corrupt_tags(RECOLOR, SCHEMA, 0.3, seed=1, index=i) for i in range(3000)]
    assert corrupt_tags(RECOLOR, SCHEMA, 0.0, 0, 5) == RECOLOR and corrupt_tags([], SCHEMA, 1.0, 0, 5) == []
    swapped_in = Counter(i for o in changed for i in set(o) - set(RECOLOR))
    assert len(swapped_in) > 5  # every level's other tags are used
    with pytest.raises(ValueError, match=r"tag_noise must be a fraction of samples in \[0, 1\]; got 1.5"):
        SynthTAGDataModule(tag_noise=1.5)


def test_synthtag_noise_touches_training_tags_only():
    clean, noisy = SynthTAGDataModule(batch_size=64, val_samples=64), SynthTAGDataModule(batch_size=64, val_samples=64, tag_noise=0.5)
    a, b = next(iter(clean.train_dataloader())), next(iter(noisy.train_dataloader()))
    assert torch.equal(a["target"], b["target"]) and torch.equal(a["tags"].sum(1), b["tags"].sum(1))
    differs = (a["tags"] != b["tags"]).any(1).float().mean().item()
    assert 0.3 < differs < 0.7
    assert torch.equal(next(iter(clean.val_dataloader()))["tags"], next(iter(noisy.val_dataloader()))["tags"])


def test_manifest_noise_is_fixed_per_row(tmp_path):
    manifest = str(square_manifest(tmp_path))
    dm = ManifestDataModule([manifest], max_area=1024, batch_size=8, val_fraction=0.0, tag_noise=1.0)
    seen: dict[int, list[float]] = {}
    for _, batch in zip(range(6), dm.train_dataloader()):
        for index, tags in zip(batch["index"].tolist(), batch["tags"].tolist()):
            row_tags = dm.schema.multi_hot(dm.rows[index].tag_ids).tolist()
            if len(dm.rows[index].tag_ids) > 1 or dm.rows[index].tag_ids[0] != 3:
                assert tags != row_tags  # rate 1: every corruptible row is corrupted ...
            assert seen.setdefault(index, tags) == tags  # ... the same way every time it is drawn
