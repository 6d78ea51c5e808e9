"""The ablation study: paired statistics on known answers, preset checks, and the shipped suite for
2 steps per run (with resume: finished runs are skipped, unfinished or changed ones start over)."""

import json
import math
from pathlib import Path

import pytest

from tagmoe_lit.study import Preset, PresetError, paired
from tagmoe_lit.study.runner import main as study

ROOT = Path(__file__).resolve().parents[1]


def samples(values, index=None, task="recolor"):
    index = list(range(len(values))) if index is None else index
    return {"index": index, "task": [task] * len(values), "success": values}


def test_paired_difference_pools_shared_samples_of_shared_seeds():
    a = {0: samples([1.0, 2.0, 3.0, math.nan]), 1: samples([5.0, 5.0], index=[7, 8]), 2: samples([9.0])}
    b = {0: samples([0.0, 0.0, 0.0, 1.0]), 1: samples([4.0, 2.0], index=[8, 9])}  # seed 1 shares only id 8
    p = paired(a, b, "success")
    # seed 0: 1, 2, 3 (the NaN sample drops out); seed 1: id 8 → 5 − 4 = 1; seed 2 exists only in a
    assert p.n == 4 and p.mean == pytest.approx(7 / 4)
    sd = math.sqrt(sum((d - 7 / 4) ** 2 for d in (1, 2, 3, 1)) / 3)
    assert p.se == pytest.approx(sd / 2)
    assert p.seed_means == pytest.approx((2.0, 1.0))
    assert p.significant and p.seeds_agree
    assert paired(a, b, "success", tasks={"add"}) is None


def test_paired_difference_of_noise_around_zero_is_not_significant():
    a = {0: samples([0.1, -0.1, 0.2, -0.2])}
    b = {0: samples([0.0, 0.0, 0.0, 0.0])}
    p = paired(a, b, "success")
    assert p.mean == pytest.approx(0.0, abs=1e-12) and not p.significant


@pytest.mark.parametrize("text, message", [
    ("seeds: [0]\nvariants: {a: {configs: []}}\nbogus: 1\n", r"unknown key\(s\) \['bogus'\]"),
    ("variants: {a: {configs: [nowhere.yaml]}}\n", r"config file\(s\) \['nowhere.yaml'\] do not exist"),
    ("variants: {a: {}}\ncompare: [[a, b]]\n", r"unknown variant\(s\) \['b'\]"),
    ("variants: {a: {seeds: []}}\n", "seeds must be a non-empty list of integers"),
    ("variants: {}\n", "'variants' is empty"),
])
def test_preset_mistakes_are_named(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PresetError, match=message):
        Preset.load(path, root=ROOT)


def test_runs_are_seed_major_with_extras_on_the_first_seed():
    preset = Preset.load(ROOT / "experiments/study/cpu.yaml", root=ROOT)
    runs = preset.runs()
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)
    assert {r.name for r in runs if r.curve} == {"dense/seed0", "tagmoe/seed0"}
    assert {r.name for r in runs if r.knockout} == {"tagmoe/seed0"}
    assert {r.variant for r in runs if r.seed == 2} == {"dense", "moe_agnostic", "tagmoe", "tagcond_oracle"}


def smoke(tmp_path, preset: str, *extra: str) -> list[str]:
    return ["--preset", str(ROOT / f"experiments/study/{preset}.yaml"), "--smoke", "--seeds", "0", "--out", str(tmp_path / "runs"),
            "--report", str(tmp_path / "results.md"), "--model.text_encoder.init_args.cache_dir", str(tmp_path / "text"), *extra]


def test_cpu_suite_runs_two_steps_per_run_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # preset config paths are relative to the repository
    (tmp_path / "results.md").write_text("# Results\n\nHand-written discussion stays.\n")
    study(smoke(tmp_path, "cpu"))
    runs = tmp_path / "runs"
    variants = list(Preset.load(ROOT / "experiments/study/cpu.yaml", root=ROOT).variants)
    assert {"dense", "moe_agnostic", "tagmoe", "tagcond_oracle", "heldout_tagmoe", "heldout_agnostic"} <= set(variants)
    for v in variants:
        done = json.loads((runs / v / "seed0" / "done.json").read_text())
        assert done["steps"] == 2 and done["fit_s"] > 0
        report = json.loads((runs / v / "seed0" / "test_report.json").read_text())
        assert len(report["per_sample"]["index"]) == 18
    curve = json.loads((runs / "tagmoe/seed0/curve.json").read_text())
    assert [p["step"] for p in curve] == [1, 2]
    knockout = json.loads((runs / "tagmoe/seed0/knockout.json").read_text())
    assert set(knockout) == {"all_experts", "without_e0", "without_e1", "without_e2", "without_e3"}
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# Results\n\nHand-written discussion stays.\n")
    for heading in ("#### tagmoe − dense", "#### Edit success per task", "#### Expert knockout", "#### Held-out task combinations"):
        assert heading in text
    assert "| heldout_tagmoe | move, relight |" in text
    assert (tmp_path / "results" / "cpu_curves.png").is_file()
    assert (tmp_path / "results" / "cpu_routing_tagmoe_layer_1.png").is_file()

    # resume: everything done is skipped; an unfinished run starts over; the report is rewritten in place
    capsys.readouterr()
    (runs / "dense/seed0/done.json").unlink()
    (runs / "dense/seed0/leftover").write_text("from the interrupted run")
    study(smoke(tmp_path, "cpu"))
    log = capsys.readouterr().out
    assert log.count("done, skipped") == len(variants) - 1
    assert "dense/seed0: unfinished or made with other configs; deleting" in log
    assert not (runs / "dense/seed0/leftover").exists() and (runs / "dense/seed0/done.json").is_file()
    again = (tmp_path / "results.md").read_text()
    assert again.count("<!-- study:cpu:begin") == 1 and again.startswith("# Results\n\nHand-written discussion stays.\n")

    # other overrides change every run's fingerprint: nothing finished under the old ones counts
    with pytest.raises(FileNotFoundError, match="No finished study run"):
        study(smoke(tmp_path, "cpu", "--report_only", "--model.lambda_lb", "0.02"))


@pytest.mark.slow
def test_gpu_suite_runs_two_steps_per_run_on_cpu(tmp_path, monkeypatch):
    """Every variant of the full suite (dense_wide, MLP router, flat and noisy tags …) for 2 steps."""
    monkeypatch.chdir(ROOT)
    study(smoke(tmp_path, "gpu", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--data.batch_size", "4"))
    preset = Preset.load(ROOT / "experiments/study/gpu.yaml", root=ROOT)
    for v in preset.variants:
        assert (tmp_path / "runs" / v / "seed0" / "done.json").is_file()
