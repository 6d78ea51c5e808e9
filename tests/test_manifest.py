"""ManifestDataModule: the SynthTAG batch contract, buckets, resumable order, stable split, mixing
weights, bad rows (error naming file and line, or skip with a count), and a 2-step fit through the CLI."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from manifest_helpers import square_manifest, wide_manifest
from tagmoe_lit.cli import TagMoECLI
from tagmoe_lit.data import ManifestDataModule, ManifestError, SynthTAGDataModule
from tagmoe_lit.data.bucket_sampler import BucketSchedule
from tagmoe_lit.data.buckets import aspect_buckets, fit_to_bucket, nearest_bucket
from tagmoe_lit.data.manifest_datamodule import ManifestStream
from helpers import BASE, smoke_args

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifests")
    return square_manifest(root), wide_manifest(root)


def _dm(manifests, **kwargs) -> ManifestDataModule:
    kwargs = {"max_area": 4096, "batch_size": 4, "val_fraction": 0.2, **kwargs}
    return ManifestDataModule([str(m) for m in manifests], **kwargs)


def test_buckets_keep_sides_multiples_of_16_and_fit_images_without_stretching():
    buckets = aspect_buckets(4096)
    assert buckets == [(48, 80), (64, 64), (80, 48)]
    assert nearest_bucket(32, 64, buckets) == (48, 80) and nearest_bucket(500, 490, buckets) == (64, 64)
    image = torch.arange(2 * 4 * 8, dtype=torch.float32).view(2, 4, 8)  # 4×8 → cover 4×4 means no resize, crop the middle
    assert torch.equal(fit_to_bucket(image, (4, 4)), image[:, :, 2:6])
    with pytest.raises(ValueError, match=r"max_area 100 must be at least multiple² = 256"):
        aspect_buckets(100)


@pytest.mark.parametrize("max_area, multiple, max_aspect", [(512 * 512, 16, 2.0), (768 * 768, 32, 3.0), (2048, 16, 2.0), (1024 * 1024, 64, 1.5)])
def test_buckets_are_mirror_symmetric_so_portrait_and_landscape_get_the_same_shapes(max_area, multiple, max_aspect):
    buckets = aspect_buckets(max_area, multiple, max_aspect)
    assert set(buckets) == {(w, h) for h, w in buckets} and buckets == sorted(set(buckets))
    assert all(h % multiple == w % multiple == 0 and h * w <= max_area and max(h / w, w / h) <= max_aspect for h, w in buckets)
    for h, w in [(900, 500), (500, 900), (333, 777), (777, 333)]:  # an image and its transpose go to transposed buckets
        assert nearest_bucket(h, w, buckets) == nearest_bucket(w, h, buckets)[::-1]
    if max_area == 512 * 512:
        assert (688, 368) in buckets and (368, 688) in buckets  # rounding down per height alone only had the first


def test_batches_follow_the_synthtag_contract_one_size_per_batch(manifests):
    dm = _dm(manifests)
    synth = next(iter(SynthTAGDataModule(batch_size=4).train_dataloader()))
    sizes = set()
    for batch in (b for _, b in zip(range(12), dm.train_dataloader())):
        assert batch.keys() == synth.keys()
        for key in synth:
            if isinstance(synth[key], torch.Tensor):
                assert batch[key].dtype == synth[key].dtype and batch[key].dim() == synth[key].dim(), key
        B, _, H, W = batch["target"].shape
        sizes.add((H, W))
        assert B == 4 and batch["source"].shape == batch["target"].shape and batch["mask"].shape == (B, H, W)
        assert batch["mask"].all() and 0 <= batch["target"].min() and batch["target"].max() <= 1
        assert batch["tags"].shape == (B, dm.schema.num_tags) and (batch["tags"].sum(1) >= 1).all()
        no_source = ~batch["has_source"]
        assert batch["source"][no_source].abs().sum() == 0
        for i, index in enumerate(batch["index"].tolist()):
            row = dm.rows[index]
            assert dm.task_names[batch["task"][i]] == row.task and batch["instruction"][i] == row.instruction
            assert batch["tags"][i].nonzero().flatten().tolist() == list(row.tag_ids)
    assert sizes == {(64, 64), (48, 80)}
    assert set(dm.task_names) == {"generate", "recolor", "add", "remove", "move", "background", "stylize", "relight", "customize"}


def test_training_order_resumes_by_global_batch_and_splits_ranks_and_workers(manifests):
    dm = _dm(manifests, batch_size=3)
    load, split = dm.row_loader(train=True), dm.split
    rows = [dm.rows[i] for i in split.train]

    def indices(n, seed=0, workers=0, **kw):
        schedule = BucketSchedule([load.bucket(r) for r in rows], split.train_weights, 3, seed)
        stream = ManifestStream(rows, split.train, load, schedule, **kw)
        it = iter(DataLoader(stream, batch_size=None, num_workers=workers))
        return [next(it)["index"].tolist() for _ in range(n)]

    full = indices(4)
    assert indices(2, start_batch=2) == full[2:]
    assert indices(2, rank=0, world_size=2) == [full[0], full[2]] and indices(2, rank=1, world_size=2) == [full[1], full[3]]
    assert indices(4, workers=2) == full
    assert indices(4, seed=1) != full


def test_split_is_stable_when_rows_are_reordered_or_annotated(manifests, tmp_path):
    square, _ = manifests
    lines = square.read_text().splitlines()
    shuffled = square.parent / "shuffled.jsonl"
    annotated = [{**json.loads(line), "annotation": {"annotator": "rule", "raw": {}, "problem": None}} for line in lines]
    shuffled.write_text("\n".join(json.dumps(row) for row in annotated[::-1]))
    a, b = _dm([square], val_fraction=0.3), _dm([shuffled], val_fraction=0.3)
    names = lambda dm, idx: sorted(dm.rows[i].target.name for i in idx)  # noqa: E731
    assert names(a, a.split.val) == names(b, b.split.val) and 0 < len(a.split.val) < len(lines)
    assert not set(names(a, a.split.val)) & set(names(a, a.split.train))
    assert len(_dm([square], val_fraction=0.3, val_samples=2).split.val) == 2
    val = list(_dm([square], val_fraction=0.3).val_dataloader())
    assert sum(len(b["index"]) for b in val) == len(a.split.val)


def test_split_does_not_depend_on_how_the_target_path_is_spelled(manifests):
    square, _ = manifests
    rows = [json.loads(line) for line in square.read_text().splitlines()]
    spellings = [lambda t: str(square.parent / t), lambda t: "./" + t.replace("/", "//"), lambda t: f"images/../{t}"]
    spelled = square.parent / "spelled.jsonl"  # beside the images, every row's target written another way
    spelled.write_text("".join(json.dumps({**r, "target": spellings[i % 3](r["target"])}) + "\n" for i, r in enumerate(rows)))
    a, b = _dm([square], val_fraction=0.3), _dm([spelled], val_fraction=0.3)
    assert [r.split_hash for r in a.rows] == [r.split_hash for r in b.rows] and a.split == b.split
    keyed = square.parent / "keyed.jsonl"  # an explicit split_key replaces the target path in the hash
    keyed.write_text("".join(json.dumps({**r, "split_key": r["target"] if i else "elsewhere"}) + "\n" for i, r in enumerate(rows)))
    c = _dm([keyed], val_fraction=0.3)
    assert c.rows[0].split_hash != a.rows[0].split_hash and [r.split_hash for r in c.rows[1:]] == [r.split_hash for r in a.rows[1:]]


def test_val_samples_keeps_the_lowest_hashes_from_every_manifest(manifests):
    dm = _dm(manifests, val_fraction=0.6, val_samples=5)
    full = _dm(manifests, val_fraction=0.6)
    lowest = sorted(full.split.val, key=lambda i: full.rows[i].split_hash)[:5]
    assert dm.split.val == sorted(lowest) == dm.split.test  # positions in row order; test defaults to the capped validation
    assert {dm.rows[i].manifest for i in dm.split.val} == set(manifests)  # not just the first manifest's first rows
    assert set(dm.split.val) <= set(full.split.val) and not set(dm.split.val) & set(dm.split.train)
    with pytest.raises(ValueError, match=r"val_samples must be at least 0"):
        _dm(manifests, val_samples=-1)


def test_an_empty_source_list_means_no_source_and_only_the_first_source_is_used(manifests, tmp_path):
    _, wide = manifests
    rows = [json.loads(line) for line in wide.read_text().splitlines()]
    listed = next(r for r in rows if isinstance(r.get("source"), list))
    assert (wide.parent / listed["source"][1]).is_file()  # the helper's second source exists, yet is not read
    path = wide.parent / "empty_source.jsonl"
    path.write_text(json.dumps({**listed, "source": []}) + "\n" + json.dumps(listed) + "\n")
    dm = _dm([path], val_fraction=0.0)
    assert dm.rows[0].source is None and dm.rows[1].source == wide.parent / listed["source"][0]


def test_text_files_are_read_and_written_as_utf8_whatever_the_locale(manifests, tmp_path):
    square, _ = manifests
    rows = [json.loads(line) for line in square.read_text().splitlines()[:2]]
    for r in rows:
        r.update({k: str(square.parent / r[k]) for k in ("target", "source") if k in r})
    rows[0]["instruction"] = "make the red circle blue — très bien\u2028merci"  # U+2028 must not end the line
    manifest = tmp_path / "utf8.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("- instruction: un cercle rouge, s'il vous plaît\n  name: cafe\n", encoding="utf-8")
    script = (
        "import sys; from tagmoe_lit.data.manifest import read_manifest; from tagmoe_lit.data.prompts import PromptListDataset;"
        "from tagmoe_lit.tags import TagSchema; from tagmoe_lit.tags.annotators.run import main;"
        "rows, bad = read_manifest(sys.argv[1], TagSchema.load('synthtag')); assert not bad and len(rows) == 2, bad;"
        "assert rows[0].instruction.endswith('tr\\u00e8s bien\\u2028merci');"  # the command line itself stays ASCII
        "assert PromptListDataset(sys.argv[2], 32, 'synthtag').items[0]['instruction'].endswith('pla\\u00eet');"
        "main(['--manifest', sys.argv[1], '--out', sys.argv[3], '--no-progress']);"
        "assert main(['--manifest', sys.argv[1], '--out', sys.argv[3], '--no-progress']).resumed == 2"
    )
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}  # an ASCII locale
    done = subprocess.run([sys.executable, "-c", script, str(manifest), str(prompts), str(tmp_path / "out.jsonl")],
                          env=env, capture_output=True, text=True, encoding="utf-8")
    assert done.returncode == 0, done.stderr[-2000:]
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps({**rows[1], "instruction": "ajout\xe9"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ManifestError, match=r"latin1.jsonl is not UTF-8 text \(bad byte at offset \d+\); save it as UTF-8"):
        _dm([tmp_path / "latin1.jsonl"]).setup("fit")


def test_manifests_mix_by_weight_whatever_their_size(manifests):
    dm = _dm(manifests, weights=[1.0, 3.0], val_fraction=0.0)
    n_square = sum(1 for r in dm.rows if r.manifest == manifests[0])
    train = dm.split.train
    schedule = BucketSchedule([(0, 0)] * len(train), dm.split.train_weights, 1, 0)  # one bucket: weights alone
    draws = Counter(train[schedule.batch(g)[0]] < n_square for g in range(4000))
    assert draws[False] / 4000 == pytest.approx(0.75, abs=0.03)  # 9 wide rows get 3/4 of the draws, 18 square rows 1/4
    with pytest.raises(ValueError, match=r"weights \[1.0\] must give one positive number per manifest \(2 manifests\)"):
        _dm(manifests, weights=[1.0])


# -- bad rows ----------------------------------------------------------------------------------
@pytest.fixture
def bad_rows(manifests, tmp_path):
    """A manifest of 2 good rows, then one bad row of each kind (lines 3..9)."""
    square, _ = manifests
    good = [json.loads(l) for l in square.read_text().splitlines()[1:3]]
    img = square.parent / "images"
    for row in good:
        row["target"] = str(img / row["target"].split("/")[-1])
        row["source"] = str(img / row["source"].split("/")[-1])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    t = good[0]
    bad = [
        json.dumps({**t, "target": "missing.png"}),
        '{"instruction": "add a cat", ',
        json.dumps({**t, "tags": ["local editing", "cat editing"]}),
        json.dumps({**t, "instruction": "   "}),
        json.dumps({**t, "target": "garbage.png"}),
        json.dumps({**t, "annotation": {"problem": "no 'scope' rule matched"}}),
        json.dumps({k: v for k, v in t.items() if k != "tags"}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in good] + bad) + "\n")
    return path


@pytest.mark.parametrize(
    "line, message",
    [
        (3, r"target image 'missing.png' does not exist \(looked for .*missing.png\)"),
        (4, r"not valid JSON"),
        (5, r"Unknown tag 'cat editing' for schema synthtag"),
        (6, r"'instruction' must be a non-empty string"),
        (7, r"target image 'garbage.png' cannot be read as an image"),
        (8, r"the annotator flagged it \(no 'scope' rule matched\)"),
        (9, r"it has no 'tags' \(annotate the manifest first, or set require_tags: false"),
    ],
)
def test_each_bad_row_stops_the_run_naming_file_line_and_fix(bad_rows, line, message):
    lines = bad_rows.read_text().splitlines()
    only = bad_rows.parent / f"only{line}.jsonl"
    only.write_text("\n".join(lines[:2] + [""] * (line - 3) + [lines[line - 1]]) + "\n")
    with pytest.raises(ManifestError, match=rf"only{line}.jsonl line {line}: {message}.*set data.on_bad_sample: skip"):
        _dm([only]).setup("fit")


def test_skip_leaves_bad_rows_out_with_one_warning_and_a_count(bad_rows):
    with pytest.warns(UserWarning, match=r"Skipped 7 bad rows of 9 in .*bad.jsonl \(first: .*bad.jsonl line 3: target image"):
        dm = _dm([bad_rows], on_bad_sample="skip", val_fraction=0.0)
        dm.setup("fit")
    assert len(dm.rows) == 2
    untagged = _dm([bad_rows], on_bad_sample="skip", require_tags=False, val_fraction=0.0)
    with pytest.warns(UserWarning, match="Skipped 6 bad rows"):
        assert untagged.rows[-1].tag_ids == () and untagged.rows[-1].task == untagged.rows[0].task  # kept its task name, trains with zero tags


def test_an_image_that_fails_only_when_decoded_errors_or_is_dropped(manifests, tmp_path):
    square, _ = manifests
    rows = [json.loads(l) for l in square.read_text().splitlines()[1:3]]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")  # sources are only decoded when loaded
    for r in rows:
        for k in ("target", "source"):
            r[k] = str(square.parent / r[k])
    rows[1]["source"] = "images/broken.png"
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ManifestError, match=r"m.jsonl line 2: an image of this row cannot be decoded .*on_bad_sample: skip"):
        list(zip(range(10), _dm([path], val_fraction=0.0, batch_size=2).train_dataloader()))
    skip = _dm([path], val_fraction=0.0, batch_size=2, on_bad_sample="skip")
    with pytest.warns(UserWarning, match=r"m.jsonl line 2: an image of this row cannot be decoded .*dropped from its batch"):
        batches = [b for _, b in zip(range(6), skip.train_dataloader())]
    assert all(i == 0 for b in batches for i in b["index"].tolist())


def test_a_manifest_yaml_fits_two_steps_through_the_cli_with_two_buckets(manifests, tmp_path):
    square, wide = manifests
    cli = TagMoECLI(args=[
        "fit", "--config", str(BASE),
        "--data", "tagmoe_lit.data.ManifestDataModule",
        "--data.manifests", json.dumps([str(square), str(wide)]),
        "--data.max_area", "2048", "--data.val_fraction", "0.2",
        *smoke_args(tmp_path), "--trainer.limit_val_batches", "0",  # validation on manifests: test_configs' manifest_example
    ])
    assert isinstance(cli.datamodule, ManifestDataModule) and cli.trainer.global_step == 2
    assert cli.datamodule.batch_size == 4 and cli.model.schema.fingerprint == cli.datamodule.schema.fingerprint
    assert cli.datamodule.buckets == [(32, 48), (32, 64), (48, 32), (64, 32)]
