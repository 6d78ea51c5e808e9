"""Editing metrics on real SynthTAG samples and hand-made cases whose answers are known."""

import pytest
import torch

from tagmoe_lit.data.synthtag import TASKS, SynthTAG
from tagmoe_lit.metrics.editing import (
    PSNR_CAP,
    EditThresholds,
    confusion,
    edit_metrics,
    source_alternatives,
    ssim_map,
)

EDIT_TASKS = [t for t in TASKS if t != "generate"]


def batch(tasks: list[str], indices: range = range(2), size: int = 32) -> dict[str, torch.Tensor]:
    """Every (index, task) pair as a float batch shaped like the datamodule's."""
    ds = SynthTAG(image_size=size, seed=0)
    samples = [ds.sample(i, task=t) for t in tasks for i in indices]
    zeros = torch.zeros(3, size, size, dtype=torch.uint8)
    return {
        "source": torch.stack([zeros if s.source is None else s.source for s in samples]).float() / 255,
        "target": torch.stack([s.target for s in samples]).float() / 255,
        "mask": torch.stack([s.mask for s in samples]),
        "has_source": torch.tensor([s.source is not None for s in samples]),
        "task": torch.tensor([TASKS.index(s.task) for s in samples]),
    }


def metrics_of(b: dict[str, torch.Tensor], generated: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    return edit_metrics(generated, b["target"], b["source"], b["mask"], b["has_source"], **kwargs)


def test_ground_truth_scores_perfectly_on_every_task():
    b = batch(list(TASKS))
    m = metrics_of(b, b["target"])
    assert m["success"].eq(1).all() and m["edit_accuracy"].eq(1).all() and m["psnr_edit"].eq(PSNR_CAP).all()
    assert torch.allclose(m["ssim_edit"], torch.ones(()), atol=1e-4)
    local = ~b["mask"].flatten(1).all(1)  # recolor / add / remove / move / background
    assert m["preserve_accuracy"][local].eq(1).all() and m["psnr_preserved"][local].eq(PSNR_CAP).all()
    assert torch.allclose(m["ssim_preserved"][local], torch.ones(()), atol=1e-4)
    assert m["preserve_accuracy"][~local].isnan().all() and m["ssim_preserved"][~local].isnan().all()


def test_copying_the_source_fails_every_edit_task():
    b = batch(EDIT_TASKS)
    m = metrics_of(b, b["source"])
    assert m["success"].eq(0).all() and m["edit_accuracy"].eq(0).all()


@pytest.mark.parametrize("shift, success", [(0.05, 1.0), (0.15, 0.0)])
def test_uniform_shift_within_tolerance_succeeds(shift: float, success: float):
    b = batch(list(TASKS), range(1))
    m = metrics_of(b, (b["target"] + shift).clamp(0, 1))
    assert m["success"].eq(success).all()


def test_corrupting_preserved_pixels_fails_a_correct_local_edit():
    b = batch(["recolor"], range(1))
    top_HW = (torch.arange(32) < 8).view(32, 1).expand(32, 32)
    corrupt_BHW = ~b["mask"] & top_HW
    generated = torch.where(corrupt_BHW.unsqueeze(1), 1 - b["target"], b["target"])
    m = metrics_of(b, generated)
    expected = 1 - corrupt_BHW.sum() / (~b["mask"]).sum()
    assert m["edit_accuracy"].item() == 1 and m["success"].item() == 0
    assert m["preserve_accuracy"].item() == pytest.approx(expected.item())
    assert m["psnr_preserved"].item() < 20 and m["ssim_preserved"].item() < 1


def test_empty_regions_are_nan():
    size = 16
    target = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, size, size, dtype=torch.bool)
    has_source = torch.tensor([True, False])
    m = edit_metrics(target, target, target, mask, has_source)  # sample 0: a no-op edit, sample 1: generate
    for key in ("edit_accuracy", "success", "psnr_edit", "ssim_edit"):
        assert m[key][0].isnan() and not m[key][1].isnan(), key
    assert m["preserve_accuracy"].isnan().all() and m["psnr_preserved"].isnan().all()
    assert m["success"][1] == 1.0


def test_source_alternatives_reproduce_synthtag_global_edits():
    b = batch(["stylize", "relight"], range(8))
    alternatives = source_alternatives(b["source"])
    matched = torch.stack([(a == b["target"]).flatten(1).all(1) for a in alternatives.values()])
    assert matched.sum(0).eq(1).all()  # each target is exactly one of them
    assert matched.any(1).all()  # 8 samples per task draw both variants


def test_another_tasks_target_counts_as_confusion():
    ds = SynthTAG(image_size=32, seed=0)
    sample = next(s for i in range(20) if (s := ds.sample(i, task="relight")).instruction == "make the image darker")
    source, target = sample.source[None].float() / 255, sample.target[None].float() / 255
    generated = torch.cat([1 - source, target])  # the source inverted; the ground truth
    targets = target.expand(2, -1, -1, -1)
    candidates = {k: v.expand(2, -1, -1, -1) for k, v in source_alternatives(source).items()}
    index = confusion(generated, targets, torch.stack(list(candidates.values())), EditThresholds())
    assert index.tolist() == [list(candidates).index("stylize/invert"), -1]


def test_ssim_map_is_aligned_with_the_image():
    size = 16
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, size, size, generator=g)
    generated = target.clone()
    generated[..., :8] = torch.rand(1, 3, size, 8, generator=g)  # columns 0-7 differ
    ssim_HW = ssim_map(generated, target, kernel=3)[0]
    assert ssim_HW.shape == (size, size)
    assert (ssim_HW[:, 9:] == 1).all() and (ssim_HW[:, 8] < 1).all()  # a 3 px window reaches 1 column
