"""Monitoring, `test`, `predict` and knockout end to end through the CLI, on the tiny base config."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.io import write_png

from callbacks import ExpertLoadMonitor
from tagmoe_lit.cli import TagMoECLI
from tagmoe_lit.data.synthtag import TASKS, SynthTAG
from tagmoe_lit.__main__ import run as run_kit
from tagmoe_lit.knockout import knockout
from helpers import BASE, smoke_args, tiny_module

MONITORS = """
trainer:
  callbacks:
    - class_path: callbacks.ExpertLoadMonitor
      init_args: {every_n_steps: 1}
    - class_path: callbacks.SpecializationMonitor
    - class_path: callbacks.RoutingSignatureMonitor
    - class_path: callbacks.SampleGrid
      init_args:
        sampler: {class_path: tagmoe_lit.sampling.EulerSampler, init_args: {steps: 2}}
    - class_path: callbacks.PredictionWriter
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true}
"""
FAST_SAMPLER = ["--model.sampler.steps", "2", "--model.sampler.guidance", "2.0"]


def run(tmp_path: Path, subcommand: str, *extra: str, steps: int = 2) -> TagMoECLI:
    overlay = tmp_path / "monitors.yaml"
    overlay.write_text(MONITORS)
    return TagMoECLI(args=[subcommand, "--config", str(BASE), "--config", str(overlay), *smoke_args(tmp_path, steps), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, TagMoECLI]:
    """4 steps with every monitor on, validating once at the end on 18 samples (2 per task)."""
    tmp_path = tmp_path_factory.mktemp("run")
    cli = run(tmp_path, "fit", "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "4",
              "--data.val_samples", "18", "--data.eval_batch_size", "9", "--trainer.limit_val_batches", "null", steps=4)
    return tmp_path, cli


def test_tensorboard_shows_loads_heatmaps_specialization_and_sample_grids(trained):
    _, cli = trained
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {k: [e.value for e in events.Scalars(k)] for k in tags["scalars"]}
    for term in ("flow", "lb", "align", "align_shuffled", "align_constant", "loss", "router_entropy", "flow_sigma_q1"):
        assert f"train/{term}" in scalars, term
    for i in range(len(cli.model.moe_layers)):
        loads = [scalars[f"moe/layer_{i}/load_e{j}"][-1] for j in range(4)]
        assert sum(loads) == pytest.approx(1.0, abs=1e-5)
        for key in ("load_cv", "entropy", "sample_entropy", "dead_experts"):
            assert f"moe/layer_{i}/{key}" in scalars, key
        assert 0 <= scalars[f"val_routing/layer_{i}/nmi"][-1] <= 1 and f"val_routing/layer_{i}/nmi_shuffled" in scalars
        assert f"val_routing/heatmap/layer_{i}" in tags["images"] and f"moe/layer_{i}/load" in tags["histograms"]
    for task in TASKS:
        assert sum(scalars[f"val_routing/{task}/e{j}"][-1] for j in range(4)) == pytest.approx(1.0, abs=1e-5)
        assert -1 <= scalars[f"val_align/{task}/cos"][-1] <= 1
    assert {"val_routing/heatmap/tags", "val_align/semantic_cosine", "val_samples/grid"} <= set(tags["images"])
    grid = events.Images("val_samples/grid")[-1]
    cell = cli.datamodule.image_size + 2  # an image with make_grid's 2-px padding, then the grid's 2× upscale
    assert grid.height == 2 * (9 * cell + 2) and grid.width == 2 * (3 * cell + 2)  # 9 tasks × (source | target | generated)
    assert {"val/flow_fixed", "val/flow_fixed_uncond", "val/cond_gain"} <= set(scalars)


def test_dead_and_collapsed_experts_are_warned_once_after_patience():
    monitor = ExpertLoadMonitor(min_share=0.05, max_share=0.9, patience=2)
    skewed = torch.tensor([[0.95, 0.03, 0.01, 0.01]])
    monitor.check_health(skewed, step=7)  # first check: within patience, silent
    with pytest.warns(UserWarning) as caught:
        monitor.check_health(skewed, step=8)
        monitor.check_health(skewed, step=9)  # already warned: no repeat
    messages = [str(w.message) for w in caught]
    assert len(messages) == 4  # 3 dead experts + 1 collapse
    assert any("expert 0: load share over 90% for 2 checks" in m and "collapse" in m for m in messages)
    assert any("expert 3: load share under 5%" in m and "raise `model.lambda_lb`" in m for m in messages)


def test_test_prints_and_writes_per_task_metrics_and_nmi(trained, capsys):
    tmp_path, cli = trained
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    tested = run(tmp_path, "test", "--ckpt_path", ckpt, "--data.test_samples", "18", *FAST_SAMPLER)
    report = json.loads(Path(tested.trainer.log_dir, "test_report.json").read_text())
    assert set(report["tasks"]) == set(TASKS) and all(n == 2 for n in report["samples"].values())
    for key in ("flow_fixed", "success", "edit_accuracy", "preserve_accuracy", "psnr_edit", "ssim_edit", "confusion"):
        assert key in report["tasks"]["recolor"], key
    assert 0 <= report["routing"]["layer_1"]["nmi"] <= 1
    printed = capsys.readouterr().out
    assert "| recolor | 2 |" in printed and "NMI(task; top-1 expert)" in printed


def test_predict_writes_pngs_and_a_jsonl_with_routing_signatures(trained):
    tmp_path, cli = trained
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    args = ["--ckpt_path", ckpt, "--data.test_samples", "3", *FAST_SAMPLER]
    first = run(tmp_path, "predict", *args)
    out = Path(first.trainer.log_dir, "predictions")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["00000", "00001", "00002"] and rows[1]["task"] == TASKS[1]
    assert len(rows[0]["signature"]) == 4 and sum(rows[0]["signature"]) == pytest.approx(1.0, abs=1e-4)
    assert len(rows[0]["signature_layers"]) == len(first.model.moe_layers)
    png = (out / "00000.png").read_bytes()
    assert png.startswith(b"\x89PNG") and not list(out.glob("*.tmp"))
    second = run(tmp_path, "predict", *args)  # same seeds, same images
    assert Path(second.trainer.log_dir, "predictions", "00000.png").read_bytes() == png


def test_predict_reads_a_prompt_list_with_and_without_source_images(trained):
    tmp_path, cli = trained
    source = SynthTAG(image_size=32, seed=5).sample(0, task="recolor").source
    write_png(source, str(tmp_path / "scene.png"))
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("- {instruction: a red circle on a plain blue background, name: circle}\n"
                       "- {instruction: make the image darker, source: scene.png, name: darker}\n")
    done = run(tmp_path, "predict", "--ckpt_path", cli.trainer.checkpoint_callback.last_model_path,
               "--data.predict_file", str(prompts), *FAST_SAMPLER)
    out = Path(done.trainer.log_dir, "predictions")
    rows = {r["name"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert rows["darker"]["has_source"] and not rows["circle"]["has_source"] and "task" not in rows["circle"]
    assert rows["darker"]["instruction"] == "make the image darker"
    assert (out / "circle.png").exists() and (out / "darker.png").exists()


def test_knockout_reports_each_experts_effect_per_task(trained):
    tmp_path, cli = trained
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    args = ["--config", str(BASE), *smoke_args(tmp_path), "--data.test_samples", "9", "--model.sample_in_test", "false"]
    results = run_kit(["knockout", *args, "--ckpt_path", ckpt])
    assert list(results) == ["all_experts", "without_e0", "without_e1", "without_e2", "without_e3"]
    assert any(results[k]["all"]["flow_fixed"] != results["all_experts"]["all"]["flow_fixed"] for k in list(results)[1:])
    text = Path(ckpt).parent.joinpath("knockout.md").read_text()
    assert "| recolor |" in text and "Δ without_e2" in text
    with pytest.raises(SystemExit):
        run_kit(["knockout", *args])  # no --ckpt_path: usage error, not a traceback


def test_knockout_runs_each_expert_out_and_restores_the_layers_even_on_failure():
    model = tiny_module()
    seen = []

    def test(*args, **kwargs):
        seen.append([layer.knocked_out for layer in model.moe_layers])
        model.test_summary = {"run": len(seen)}
        if len(seen) == 3:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        knockout(SimpleNamespace(model=model, trainer=SimpleNamespace(test=test), datamodule=None), "x.ckpt")
    assert seen == [[(), ()], [(0,), (0,)], [(1,), (1,)]]
    assert all(not layer.knocked_out for layer in model.moe_layers) and model.test_report_name == "test_report"
