"""The ablation study: paired statistics on known answers, preset checks, and the shipped suite for
2 steps per run (with resume: finished runs are skipped, unfinished or changed ones start over)."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from tagmoe_lit.metrics.report import TaskReport
from tagmoe_lit.study import Preset, PresetError, paired
from tagmoe_lit.study.paired import t_quantile_975
from tagmoe_lit.study.report import write_report
from tagmoe_lit.study.runner import main as study
from tagmoe_lit.study.runs import RunKey, fingerprint, load_done, run_dir

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


@pytest.mark.parametrize("df, t", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042), (60, 2.000), (120, 1.980), (10**6, 1.960)])
def test_t_quantile_matches_published_values(df, t):
    assert t_quantile_975(df) == pytest.approx(t, abs=5e-4)


def test_t_quantile_needs_a_degree_of_freedom():
    with pytest.raises(ValueError, match="at least two seeds"):
        t_quantile_975(0)


def seeds_of(means, jitter=(0.01, -0.01), k=20):
    """a and b per seed: b = 0, a = the seed's mean difference ± a small jitter (k samples, ids shared)."""
    a = {s: samples([m + jitter[i % 2] for i in range(k)]) for s, m in enumerate(means)}
    b = {s: samples([0.0] * k) for s in range(len(means))}
    return a, b


def test_seeds_that_disagree_cannot_be_told_apart_though_the_pooled_samples_can():
    """The case of issue 16: tight differences within each seed, seeds of different sign."""
    a, b = seeds_of([0.3, -0.1, 0.4])
    p = paired(a, b, "success")
    assert p.significant and p.low > 0 and not p.seeds_agree  # 60 pooled samples: the test-sample interval excludes 0
    # by hand: mean 0.2, sd √(((0.1)² + (0.3)² + (0.2)²) / 2) = √0.07, t(0.975, 2) = 4.3027
    half = 4.302653 * math.sqrt(0.07) / math.sqrt(3)
    assert p.seeds == (0, 1, 2) and p.seed_mean == pytest.approx(0.2)
    assert p.seed_interval == pytest.approx((0.2 - half, 0.2 + half))
    assert p.seed_interval[0] < 0 < p.seed_interval[1]
    assert p.verdict(higher_better=True) == p.verdict(higher_better=False) == "cannot tell apart"


def test_seeds_that_agree_give_a_verdict_in_the_metric_direction():
    a, b = seeds_of([0.3, 0.25, 0.35])
    p = paired(a, b, "success")
    # by hand: mean 0.3, sd 0.05, t(0.975, 2) = 4.3027 → 0.3 ± 0.1242
    half = 4.302653 * 0.05 / math.sqrt(3)
    assert p.seed_interval == pytest.approx((0.3 - half, 0.3 + half)) and p.seed_interval[0] > 0
    assert p.verdict(higher_better=True) == "better" and p.verdict(higher_better=False) == "worse"
    q = paired(b, a, "success")  # the other way round
    assert q.seed_mean == pytest.approx(-0.3)
    assert q.verdict(higher_better=True) == "worse" and q.verdict(higher_better=False) == "better"


def test_one_seed_gives_no_interval_and_no_verdict():
    a, b = seeds_of([0.3])
    p = paired(a, b, "success")
    assert p.significant  # the pooled samples exclude 0 …
    assert p.n_seeds == 1 and p.seed_interval is None and p.verdict(higher_better=True) == "cannot tell apart"  # … the method is untested


def test_seed_without_shared_finite_samples_drops_out_and_seeds_weigh_the_same():
    a = {0: samples([1.0, 1.0, 1.0]), 1: samples([math.nan]), 2: samples([3.0])}
    b = {0: samples([0.0, 0.0, 0.0]), 1: samples([0.0]), 2: samples([0.0])}
    p = paired(a, b, "success")
    assert p.seeds == (0, 2) and p.seed_means == pytest.approx((1.0, 3.0))
    assert p.seed_mean == pytest.approx(2.0) and p.mean == pytest.approx(6 / 4)  # seed level: 1 seed, 1 vote; pooled: by sample


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


def test_variants_filter_keeps_each_chosen_variants_own_seeds_and_names_an_unknown_one():
    preset = Preset.load(ROOT / "experiments/study/interference.yaml", root=ROOT)
    runs = preset.only_variants(["dense_c1_w128", "tagmoe_c1_w128"]).only_seeds([1, 2]).runs()
    assert [r.name for r in runs] == ["tagmoe_c1_w128/seed1", "tagmoe_c1_w128/seed2"]  # dense runs on seed 0 only
    with pytest.raises(PresetError, match=r"no variant\(s\) \['tagmoe_c2_w128'\]"):
        preset.only_variants(["tagmoe_c2_w128"])


def fake_run(directory: Path, key: str, success: list[float], flow: float, routed: bool,
             tasks: tuple[str, str] = ("recolor", "stylize")) -> None:
    """The files a finished run leaves for the report: done.json, test_report.json (4 samples: 2 of
    each task), the TensorBoard folder with its config.yaml and a train/flow curve."""
    from torch.utils.tensorboard import SummaryWriter

    report = TaskReport(list(tasks))
    task = torch.tensor([0, 0, 1, 1])
    metrics = {"success": torch.tensor(success), "edit_accuracy": torch.full((4,), 0.5), "preserve_accuracy": torch.ones(4),
               "psnr_preserved": torch.full((4,), 30.0), "psnr_edit": torch.full((4,), 20.0), "ssim_preserved": torch.ones(4),
               "flow_fixed": torch.full((4,), flow)}
    top1 = [torch.nn.functional.one_hot(task, 2).float() * 8] if routed else []  # recolor → e0, stylize → e1
    report.add(task, metrics, top1, index_B=torch.arange(4))
    report.write(directory)
    log_dir = directory / "tensorboard" / "version_0"
    with SummaryWriter(str(log_dir)) as writer:
        for step in range(1, 4):
            writer.add_scalar("train/flow", flow / step, step)
    (log_dir / "config.yaml").write_text("data:\n  init_args: {holdout_tasks: null}\n")
    (directory / "done.json").write_text(json.dumps({"fit_s": 60.0, "test_s": 5.0, "steps": 2, "fingerprint": key}))


def test_report_is_written_from_finished_run_folders_only(tmp_path, monkeypatch):
    """2 variants × 2 seeds of hand-made run folders (no training) give known tables; a run whose
    done.json carries another fingerprint is left out; the report's own section is replaced in place."""
    monkeypatch.chdir(ROOT)  # preset config paths are relative to the repository
    (tmp_path / "p.yaml").write_text(
        "base: [experiments/base.yaml]\nseeds: [0, 1]\n"
        "variants: {dense: {configs: [experiments/dense.yaml]}, tagmoe: {configs: []}, stale: {configs: [], seeds: [0]}}\n"
        "compare: [[tagmoe, dense]]\nknockout: [tagmoe]\n")
    preset = Preset.load(tmp_path / "p.yaml", root=ROOT)
    out = tmp_path / "runs"
    success = {("dense", 0): [0, 1, 0, 0], ("dense", 1): [1, 1, 0, 0], ("tagmoe", 0): [1, 1, 1, 0], ("tagmoe", 1): [1, 1, 0, 1]}
    for run in preset.runs():
        directory = run_dir(out, run)
        key = "0" * 16 if run.variant == "stale" else fingerprint(run, [], preset.curves).current
        fake_run(directory, key, success.get((run.variant, run.seed), [1, 1, 1, 1]), 0.1 if run.variant == "tagmoe" else 0.2,
                 routed=run.variant != "dense")
    knockout = {"all_experts": {"tasks": {"recolor": {"success": 1.0, "flow_fixed": 0.1}, "stylize": {"success": 0.5, "flow_fixed": 0.1}}},
                "without_e0": {"tasks": {"recolor": {"success": 0.25, "flow_fixed": 0.4}, "stylize": {"success": None, "flow_fixed": 0.1}}}}
    (run_dir(out, preset.runs()[1]) / "knockout.json").write_text(json.dumps(knockout))
    report = tmp_path / "results.md"
    other = "<!-- study:other:begin (generated) -->\nanother preset's numbers\n<!-- study:other:end -->\n\n"
    report.write_text(f"# Results\n\nBefore.\n\n{other}<!-- study:p:begin old -->\nold numbers\n<!-- study:p:end -->\n\nAfter.\n")

    write_report(preset, out, [], report, tmp_path / "figures")
    text = report.read_text()
    assert text.startswith(f"# Results\n\nBefore.\n\n{other}<!-- study:p:begin (generated") and text.endswith("<!-- study:p:end -->\n\nAfter.\n")
    assert "old numbers" not in text and "| stale |" not in text
    # seed mean ± std of each run's mean: success (all), (local = recolor), (global = stylize), psnr_preserved, psnr_edit, flow_fixed
    assert "| dense | 2 | 0.375 ± 0.177 | 0.750 ± 0.354 | 0.000 ± 0.000 | 30.000 ± 0.000 | 20.000 ± 0.000 | 0.200 ± 0.000 | – | 1.0 |" in text
    assert "| tagmoe | 2 | 0.750 ± 0.000 | 1.000 ± 0.000 | 0.500 ± 0.000 | 30.000 ± 0.000 | 20.000 ± 0.000 | 0.100 ± 0.000 | 1.00 (" in text
    # success differences per sample: seed 0 [1, 0, 1, 0], seed 1 [0, 0, 0, 1] (recolor, recolor, stylize, stylize).
    # Seed level, t(0.975, 1) = 12.7062: all: seed means 0.5, 0.25 → 0.375 ± 12.7062 · 0.1768 / √2 = ± 1.5883;
    # local: 0.5, 0 → 0.25 ± 12.7062 · 0.3536 / √2 = ± 3.1766; global: 0.5, 0.5 → sd 0, a zero-width interval.
    assert ("| success | +0.3750 [-1.2133, +1.9633] (2 seeds) cannot tell apart | +0.2500 [-2.9266, +3.4266] (2 seeds) "
            "cannot tell apart | +0.5000 [+0.5000, +0.5000] (2 seeds) **better** |") in text
    assert "| flow_fixed | -0.1000 [-0.1000, -0.1000] (2 seeds) **better** |" in text  # −0.1 on every sample of both seeds
    assert "| psnr_edit | +0.0000 [+0.0000, +0.0000] (2 seeds) cannot tell apart |" in text
    # per seed, then the 8 (4) pooled samples' mean ± SE: the pooled "all" interval 0.375 ± 1.96 · 0.1830 excludes 0,
    # the seed-level one does not (issue 16)
    assert "| metric | tasks | seed 0 | seed 1 | test-sample noise: per-sample mean ± SE (samples) |" in text
    assert "| success | all | +0.5000 | +0.2500 | +0.3750 ± 0.1830 (8) |" in text
    assert "| success | local | +0.5000 | +0.0000 | +0.2500 ± 0.2500 (4) |" in text
    assert "| success | global | +0.5000 | +0.5000 | +0.5000 ± 0.2887 (4) |" in text
    assert "| flow_fixed | all | -0.1000 | -0.1000 | -0.1000 ± 0.0000 (8) |" in text
    assert "| recolor | 0.750 ± 0.354 | 1.000 ± 0.000 |" in text and "| stylize | 0.000 ± 0.000 | 0.500 ± 0.000 |" in text
    assert "| recolor | 1.000 | -0.750 |" in text and "| stylize | 0.500 | – |" in text  # knockout of tagmoe seed 0
    assert "No held-out run finished." in text
    assert "| tagmoe/seed1 | 2 | – | 60 | 5 | 0 | 0 |" in text and "Total: 4.3 min." in text  # threads not recorded
    assert Image.open(tmp_path / "figures" / "p_curves.png").width == 550  # no curve points: the loss panel alone
    assert (tmp_path / "figures" / "p_routing_tagmoe_layer_0.png").is_file()
    assert "](figures/p_routing_tagmoe_layer_0.png)" in text


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
        assert done["steps"] == 2 and done["fit_s"] > 0 and done["torch_threads"] == torch.get_num_threads()
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
    assert "(1 seed: no interval) cannot tell apart" in text and "| success | all | " in text  # one seed: no verdict
    assert Image.open(tmp_path / "results" / "cpu_curves.png").width == 1000  # loss and curve-point panels
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
    """Every variant of the full suite (dense_wide, MLP router, flat and noisy tags …) for 2 steps.

    Sized for any 2-core host (issue 15: 600 s was not enough at 0.47 s/step): the suite's machinery
    is what is checked, so the gpu budget's model shrinks (4 blocks × width 128, 16 px: 64 tokens per
    frame instead of 256) and its 4 data-loader workers per loader, which cost a process start at
    every validation, test and curve point, run in the main process."""
    monkeypatch.chdir(ROOT)
    small = ["--model.backbone.init_args.num_layers", "4", "--model.backbone.init_args.num_attention_heads", "4",
             "--data.image_size", "16", "--data.num_workers", "0"]
    study(smoke(tmp_path, "gpu", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--data.batch_size", "4", *small))
    preset = Preset.load(ROOT / "experiments/study/gpu.yaml", root=ROOT)
    for v in preset.variants:
        assert (tmp_path / "runs" / v / "seed0" / "done.json").is_file()


def test_runs_finished_before_the_config_reshape_are_recognised_and_migrated(tmp_path, monkeypatch):
    """Issue 14 changed resolved configs (optimizer as a class_path, FSDP2 options on the strategy, the
    encoders' caches in backbone/) but no result: the legacy form of today's config reproduces the
    fingerprint the old kit gave each run (recorded from its code), and such a run's done.json is
    accepted once and rewritten with today's fingerprint."""
    monkeypatch.chdir(ROOT)
    recorded = json.loads((ROOT / "tests/data/legacy_fingerprints.json").read_text())["fingerprints"]
    presets = {name: Preset.load(ROOT / f"experiments/study/{name}.yaml", root=ROOT) for name in ("cpu", "gpu")}
    runs = {f"{name}/{r.variant}/seed{r.seed}": (p, r) for name, p in presets.items() for r in p.runs()}
    dense = {name for name, (_, r) in runs.items() if r.variant in ("dense", "dense_wide")}
    # issue 16's defaults change what an MoE run computes: only dense runs keep their earlier results ...
    now = {name: fingerprint(runs[name][1], [], runs[name][0].curves) for name in recorded}
    assert {name: key.legacy for name, key in now.items()} == {n: (f if n in dense else None) for n, f in recorded.items()}
    # ... and an MoE run configured with the earlier behaviour is the earlier run
    moe, earlier = "--model.backbone.init_args.moe.init_args.", ["--model.align_dropped_text", "true"]
    earlier += [f"{moe}expert_init", "tied", f"{moe}expert_bias", "true"]
    keys = {name: fingerprint(runs[name][1], [] if name in dense else earlier, runs[name][0].curves) for name in recorded}
    assert {name: key.legacy for name, key in keys.items()} == recorded
    assert all(key.current != key.legacy for key in keys.values())
    name = "cpu/tagmoe/seed0"
    (tmp_path / "done.json").write_text(json.dumps({"fit_s": 1.0, "fingerprint": recorded[name]}))
    assert load_done(tmp_path, keys[name])["fit_s"] == 1.0
    migrated = json.loads((tmp_path / "done.json").read_text())
    assert migrated["fingerprint"] == keys[name].current and migrated["migrated_from"] == recorded[name]
    assert load_done(tmp_path, RunKey("another")) is None


@pytest.mark.parametrize(("name", "count"), [("fidelity", 27), ("main", 25), ("interference", 60)])
def test_a_screening_preset_resolves_every_run_to_a_distinct_config(name, count, monkeypatch):
    """Presets other than cpu/gpu (run by the smoke tests above) must at least compose: every run's config
    chain resolves, and no two runs share a fingerprint (a variant that changes nothing would)."""
    monkeypatch.chdir(ROOT)
    preset = Preset.load(ROOT / f"experiments/study/{name}.yaml", root=ROOT)
    runs = preset.runs()
    assert len({fingerprint(r, [], preset.curves).current for r in runs}) == len(runs) == count


def test_an_option_added_later_leaves_finished_runs_alone_at_its_default(monkeypatch):
    """`model.lora: null` (and EulerSampler's `renormalize: false`) compute what the kit computed before
    they existed: at those values they are left out of the fingerprint; set, they change it."""
    monkeypatch.chdir(ROOT)
    preset = Preset.load(ROOT / "experiments/study/main.yaml", root=ROOT)
    run = next(r for r in preset.runs() if r.name == "tagmoe/seed0")
    recorded = json.loads((ROOT / "docs/results/runs/main" / run.variant / f"seed{run.seed}" / "done.json").read_text())
    assert fingerprint(run, [], preset.curves).current == recorded["fingerprint"]
    assert fingerprint(run, ["--model.lora.rank", "4"], preset.curves).current != recorded["fingerprint"]


def test_the_dial_plots_the_seed_level_gap_against_conflict_level_and_width(tmp_path, monkeypatch):
    """Experiment B's table and figure: a − b of the primary metric per (level, width) cell, with
    its seed-level interval and verdict; a cell without runs stays empty; the gate model's success
    on the twin tasks says at which levels the edits were learned."""
    monkeypatch.chdir(ROOT)
    configs = {"agnostic": "[experiments/moe_agnostic.yaml]", "tagmoe": "[]", "dense": "[experiments/dense.yaml]"}
    variants = {f"{m}_c{lv}_w1": configs[m] for m in configs for lv in (0, 1)}
    (tmp_path / "d.yaml").write_text(
        "base: [experiments/base.yaml]\nseeds: [0, 1]\nvariants: {" + ", ".join(f"{k}: {{configs: {v}}}" for k, v in variants.items())
        + '}\ndial: {a: tagmoe, b: agnostic, levels: ["0", "1", "2"], widths: [w1], gate: dense, learned: 0.8}\n'
        + "compare: [[tagmoe_c1_w1, agnostic_c1_w1]]\n")
    with pytest.raises(PresetError, match=r"unknown variant\(s\) \['agnostic_c2_w1', 'dense_c2_w1', 'tagmoe_c2_w1'\]"):
        Preset.load(tmp_path / "d.yaml", root=ROOT)
    (tmp_path / "d.yaml").write_text((tmp_path / "d.yaml").read_text().replace(', "2"]', "]"))
    preset = Preset.load(tmp_path / "d.yaml", root=ROOT)
    flows = {"tagmoe_c0_w1": 0.1, "agnostic_c0_w1": 0.2, "tagmoe_c1_w1": 0.3, "agnostic_c1_w1": 0.2, "dense_c0_w1": 0.2, "dense_c1_w1": 0.2}
    tasks = {"0": ("darken", "invert"), "1": ("darken", "brighten")}  # level 1: darken's twin is trained too
    for run in preset.runs():
        level = run.variant.split("_c")[1].split("_")[0]
        success = [1, 1, 1, 0.5 - 0.5 * run.seed] if run.variant == "dense_c1_w1" else [1, 1, 1, 1]  # brighten: 0.75, then 0.5
        fake_run(run_dir(tmp_path / "runs", run), fingerprint(run, [], preset.curves).current, success,
                 flows[run.variant] + 0.01 * run.seed * (run.variant.startswith("tagmoe")), routed=True, tasks=tasks[level])
    write_report(preset, tmp_path / "runs", [], tmp_path / "results.md", tmp_path / "figures")
    text = (tmp_path / "results.md").read_text()
    assert "| width | conflict 0 | conflict 1 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| w1 |"))
    assert "-0.0950 [" in row and "(2 seeds) **better**" in row and "+0.1050 [" in row and "(2 seeds) **worse**" in row
    assert "- conflict 0: no task has its twin (2 seed(s))" in text
    assert "- conflict 1: darken 1.00 (alone 1.00), brighten 0.62 → **not learned** (2 seed(s))" in text
    assert (tmp_path / "figures" / "d_dial.png").is_file()
    # "all" in the paired tables is every task of the level, not the first variant's: the dial's +0.1050 on all 8 samples
    assert "| flow_fixed | all | +0.1000 | +0.1100 | +0.1050 ± 0.0019 (8) |" in text
    # a cell left with one seed has no interval: no verdict, and the plot draws it without one
    (tmp_path / "figures" / "d_dial.png").unlink()
    (run_dir(tmp_path / "runs", next(r for r in preset.runs() if r.name == "tagmoe_c1_w1/seed1")) / "done.json").unlink()
    write_report(preset, tmp_path / "runs", [], tmp_path / "results.md", tmp_path / "figures")
    row = next(line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| w1 |"))
    assert "(2 seeds) **better**" in row and "+0.1000 (1 seed: no interval) cannot tell apart" in row
    assert (tmp_path / "figures" / "d_dial.png").is_file()
