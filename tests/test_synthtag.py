"""SynthTAG: exact, reproducible targets and the edit invariants the rest of the kit relies on."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch

from tagmoe_lit.data.interference import CONFLICT_LEVELS, DIAL_OPS, DIAL_TASK_TAGS, TWINS
from tagmoe_lit.data.synthtag import PALETTE, POSITIONS, TASK_TAGS, TASKS, SynthSample, SynthTAG
from tagmoe_lit.tags import TagSchema

LOCAL = {"recolor", "add", "remove", "move"}
GLOBAL = {"background", "stylize", "relight"}

# sha256(instruction + source bytes (or b"") + target bytes + mask bytes) for SynthTAG(32, seed=0)[0..15].
# A change here means every stored SynthTAG result changes meaning: only update on purpose.
GOLDEN = [
    "8702c8f1c8502f4926e84367b905799164924ff35ef6b15dfbc149606029bcd4",
    "2f1712b30ee23d514cafc55840d864914dc0c44b08eb688725d5cc3423e465ec",
    "81884ea8416561525b7577a4bb2ae359c71821c2818e3ee47ca61a84cb68e0be",
    "6c0fdf73f99f8c27b614ab25c2ec9907221142dc1486988aacbb6901cc83a784",
    "a8580ef06a0ceb1f4eca90ad9b7d2f3bfa9acbdb1120c1dc8909e534c8d521a5",
    "447f2b4ebf3e2d66db4810dfdddc05b63b99c5730c11afd82963a10a4972b656",
    "f8d2b0417ce229b2e25b20b96256a735bc668f2e97c51be58415f823b8a284e5",
    "3ae96714c16bf92b87ccd6d53249a618cd5a99f8126d653ec72cbd6e4e835350",
    "4c407189c955e6663cdbb4cfa7f861f86b30e2eb50e8ab4ca3eecc0ecff60f5a",
    "725fbef36efef62b3b5be980d4d21f57be78bfa948cc7f4279b0e35f363dc4e2",
    "ecbb3e98ea16662c3ff6c91f2b6aa57dc931a8be04c8f71738829e19de5f76b9",
    "e0f3213e79e5201b675eb928d075c10c4b861085bde7a8d148a2bfde46e6d97a",
    "6c45dcf76debfdbab37b14e874d94ba93326387dda9028d38e9ec2ab8756d33d",
    "3fe262e2a3b8d15dd5193f45e70b05e47a302a54df083648c27a19a21a09bc34",
    "7ea342fff6aded13d9d60389fe5837fca915ac7a82fbefd05b0f939134a60c33",
    "265b3e5d1e05791da16b051536462dac84fbd0892b112410bcfbb1754cc9e5fe",
]


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.flatten().tolist())


def _digest(s: SynthSample) -> str:
    source = b"" if s.source is None else _bytes(s.source)
    return hashlib.sha256(s.instruction.encode() + source + _bytes(s.target) + _bytes(s.mask)).hexdigest()


def _same(a: SynthSample, b: SynthSample) -> bool:
    return _digest(a) == _digest(b) and a.task == b.task and a.tags == b.tags


def test_golden_hashes() -> None:
    gen = SynthTAG(32, seed=0)
    assert [_digest(gen[i]) for i in range(16)] == GOLDEN


def test_same_index_same_sample_in_any_call_order() -> None:
    a, b = SynthTAG(32, seed=3), SynthTAG(32, seed=3)
    forward = [a[i] for i in range(20)]
    backward = [b[i] for i in reversed(range(20))][::-1]
    assert all(_same(x, y) for x, y in zip(forward, backward))
    assert all(_same(a[i], a[i]) for i in range(20))
    assert _same(a.sample(7, "move"), b.sample(7, "move"))


def test_different_seed_gives_different_samples() -> None:
    a, b = SynthTAG(32, seed=0), SynthTAG(32, seed=1)
    assert sum(_digest(a[i]) != _digest(b[i]) for i in range(18)) == 18


def _check_invariants(gen: SynthTAG, task: str, n: int) -> None:
    size = gen.image_size
    for i in range(n):
        s = gen.sample(i, task)
        assert s.task == task and s.tags == TASK_TAGS[task]
        assert s.target.dtype == torch.uint8 and s.target.shape == (3, size, size)
        assert s.mask.dtype == torch.bool and s.mask.shape == (size, size)
        if task == "generate":
            assert s.source is None and s.mask.all()
            continue
        assert s.source is not None and s.source.dtype == torch.uint8 and s.source.shape == (3, size, size)
        differs = (s.source != s.target).any(0)
        assert not (differs & ~s.mask).any(), (task, i, s.instruction)  # target == source outside the mask
        changed = differs.float().mean().item()
        if task in LOCAL:
            assert 0 < changed < 0.10, (task, i, changed)
        elif task in GLOBAL:
            assert changed > 0.50, (task, i, changed)
        else:
            assert s.mask.all()


@pytest.mark.parametrize("task", TASKS)
def test_invariants_at_32(task: str) -> None:
    _check_invariants(SynthTAG(32, seed=0), task, 200)


@pytest.mark.parametrize("task", TASKS)
def test_invariants_at_64(task: str) -> None:
    _check_invariants(SynthTAG(64, seed=5), task, 40)


def test_tags_follow_the_schema() -> None:
    schema = TagSchema.load("synthtag")
    assert set(TASK_TAGS) == set(TASKS) | set(DIAL_TASK_TAGS) and len(TASKS) == 9  # the default draw is unchanged
    for task in TASKS:
        assert schema.encode(TASK_TAGS[task])
        for level, names in TASK_TAGS[task].items():
            assert all(schema.level_of(name) == level for name in names)
    scopes = {TASK_TAGS[t]["scope"][0] for t in TASKS}
    assert scopes == set(schema.levels["scope"])


def test_sample_tags_are_copies() -> None:
    gen = SynthTAG(32)
    gen[1].tags["scope"].append("global editing")
    assert gen[1].tags == TASK_TAGS[gen[1].task]


def test_default_draw_is_balanced_over_tasks() -> None:
    gen = SynthTAG(32)
    assert [gen[i].task for i in range(2 * len(TASKS))] == list(TASKS) * 2


def test_task_subset_restricts_draws() -> None:
    gen = SynthTAG(32, tasks=["remove", "customize"])
    assert [gen[i].task for i in range(6)] == ["remove", "customize"] * 3
    assert gen.sample(4, "relight").task == "relight"  # any task can still be asked for by name


@pytest.mark.parametrize("tasks", [["add", "paint"], "add", []])
def test_bad_tasks_raise_with_valid_names(tasks: list[str] | str) -> None:
    with pytest.raises(ValueError, match="valid tasks: .*'generate'.*'customize'"):
        SynthTAG(32, tasks=tasks)


def test_unknown_task_in_sample_raises() -> None:
    with pytest.raises(ValueError, match="unknown task 'paint'; valid tasks: .*'recolor'"):
        SynthTAG(32).sample(0, "paint")


@pytest.mark.parametrize("size", [8, 30, 36, 32.0, True])
def test_bad_image_size_raises(size: object) -> None:
    with pytest.raises(ValueError, match="multiple of 8 that is >= 16"):
        SynthTAG(size)  # type: ignore[arg-type]


def test_smallest_size_works() -> None:
    _check_invariants(SynthTAG(16), "move", 50)


def test_customize_preserves_the_subject_exactly() -> None:
    """The target holds the reference's subject pixel for pixel, in the third the instruction names."""
    gen = SynthTAG(32)
    for i in range(100):
        s = gen.sample(i, "customize")
        assert s.source is not None
        gray = s.source[:, 0, 0]
        subject = (s.source != gray.view(3, 1, 1)).any(0)
        colours = s.source[:, subject].unique(dim=1)
        assert colours.shape[1] == 2  # two-colour subject
        in_target = (s.target.unsqueeze(-1) == colours.view(3, 1, 1, 2)).all(0).any(-1)
        (ys, xs), (yt, xt) = subject.nonzero().T, in_target.nonzero().T
        crop_s = s.source[:, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        crop_t = s.target[:, yt.min() : yt.max() + 1, xt.min() : xt.max() + 1]
        fg_s = subject[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        fg_t = in_target[yt.min() : yt.max() + 1, xt.min() : xt.max() + 1]
        assert torch.equal(fg_s, fg_t) and torch.equal(crop_s[:, fg_s], crop_t[:, fg_t])
        cell = 3 * (3 * int(yt.float().mean()) // 32) + 3 * int(xt.float().mean()) // 32
        named = re.fullmatch(r"place this subject (?:at|on|in) the (.+?) on an? .+ background", s.instruction)
        assert named is not None and named.group(1) == POSITIONS[cell], (i, s.instruction)
        subject_names = {name for name, rgb in PALETTE.items() if rgb in map(tuple, colours.T.tolist())}
        assert len(subject_names) == 2 and not subject_names & set(s.instruction.split())  # only the reference shows it


def test_the_interference_dial_is_exact_and_its_twins_pull_in_opposite_directions() -> None:
    """Experiment B's tasks: global edits of the same scenes with exact targets; twins undo each
    other (colour rotation exactly, darken / brighten in direction); each conflict level has four
    tasks, of which the share 0, 0.5 or 1 have their twin beside them; the `interference` schema
    gives every operation its own type tag."""
    gen = SynthTAG(32, seed=0, tasks=list(DIAL_OPS))
    for i in range(4 * len(DIAL_OPS)):
        s = gen[i]
        assert torch.equal(s.target, DIAL_OPS[s.task][1](s.source)) and s.instruction == DIAL_OPS[s.task][0]
        assert (s.target != s.source).any(dim=0).float().mean() > 0.5  # a global edit: most pixels change
        if s.task == "rotate":
            assert torch.equal(DIAL_OPS["unrotate"][1](s.target), s.source)
        if s.task in ("darken", "brighten"):
            sign = -1 if s.task == "darken" else 1
            assert ((s.target.int() - s.source.int()) * sign >= 0).all()
    shares = {level: sum(TWINS.get(t) in tasks for t in tasks) / len(tasks) for level, tasks in CONFLICT_LEVELS.items()}
    assert shares == {"0": 0.0, "0.5": 0.5, "1": 1.0} and {len(t) for t in CONFLICT_LEVELS.values()} == {4}
    schema = TagSchema.load("interference")
    types = {schema.encode(DIAL_TASK_TAGS[t])[1] for t in DIAL_OPS}
    assert len(types) == len(DIAL_OPS)
