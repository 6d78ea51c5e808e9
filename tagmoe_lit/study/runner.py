"""`python -m tagmoe_lit study`: train, test and compare every run of a preset; resumable.

    python -m tagmoe_lit study --preset experiments/study/cpu.yaml      # = make study
    python -m tagmoe_lit study --preset experiments/study/gpu.yaml      # = make study PRESET=gpu

Each run (a variant on a seed, `preset.py`) lives in `<out>/<variant>/seed<s>/`: TensorBoard logs and
checkpoints from `fit`, `test_report.{json,md}` from `test` (per-sample numbers included), and for
some runs `curve.json` (test metrics of intermediate checkpoints) and `knockout.json`. A run is done
when its `done.json` exists with the fingerprint of its current resolved config; such runs are
skipped. A run without one (interrupted, or its config changed) is deleted and trained again from step 0,
which gives exactly the numbers of an uninterrupted run (training is deterministic and its noise
is seeded per sample) at the same number of CPU threads: the thread count changes the order of
float reductions, and a rerun with another count lands elsewhere within seed noise, so `done.json`
records it (`torch_threads`). When every run is done, `report.py` writes the results section.

Runs execute in this process, one after another, through the same CLI as `fit` / `test`, so what
the study measures is what a user of the kit gets. Extra arguments are config overrides given to
every `fit` and `test` (e.g. `--trainer.max_steps 2`); they are part of each run's fingerprint.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from tagmoe_lit.io import atomic_write_text
from tagmoe_lit.metrics.report import json_safe
from tagmoe_lit.study.preset import Preset, Run
from tagmoe_lit.study.runs import _seeded, fingerprint, load_done, run_dir

# What `--smoke` adds: 2 optimizer steps per run, one validation batch, a test sample or two per
# task, 2 sampler steps, curve checkpoints every step: the whole suite's machinery in seconds.
SMOKE = [
    "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false", "--data.val_samples", "18", "--data.test_samples", "18",
    "--data.eval_batch_size", "18", "--model.sampler.init_args.steps", "2",
]


def _cli(args: list[str]):
    from tagmoe_lit.cli import main  # imported late: `study --help` stays instant

    return main(args)


def _test(run: Run, extra: list[str], ckpt: Path, directory: Path, samples: int | None = None) -> dict:
    """`test` one checkpoint; its report lands in `directory` (returns the summary)."""
    more = ["--data.test_samples", str(samples)] if samples else []
    cli = _cli(["test", *_seeded(run, extra), *more, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(directory), "--ckpt_path", str(ckpt)])
    return cli.model.test_summary


def train_and_test(run: Run, directory: Path, extra: list[str], curve_every: int, curve_samples: int) -> dict:
    """fit, test (and the curve / knockout extras) of one run into an empty `directory`; the timings."""
    import torch  # imported late, as the CLI: `study --help` stays instant

    times: dict[str, float] = {}
    fit_args = ["fit", *_seeded(run, extra), "--trainer.default_root_dir", str(directory),
                "--trainer.logger.init_args.save_dir", str(directory)]
    if run.curve:
        fit_args.append("--trainer.callbacks+=" + json.dumps({
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": curve_every, "save_top_k": -1, "filename": "curve-{step}"}}))
    start = time.perf_counter()
    cli = _cli(fit_args)
    times["fit_s"] = time.perf_counter() - start
    ckpt_dir = Path(cli.trainer.checkpoint_callback.dirpath)
    steps = cli.trainer.global_step
    del cli
    gc.collect()
    final = ckpt_dir / "last.ckpt"
    if not final.is_file():
        raise FileNotFoundError(f"Study run {run.name}: fit wrote no {final}; the study's base configs must keep "
                                "a ModelCheckpoint with save_last: true.")
    start = time.perf_counter()
    _test(run, extra, final, directory)
    times["test_s"] = time.perf_counter() - start
    if run.curve:
        start = time.perf_counter()
        points = []
        by_step = {int(ckpt.stem.split("=")[1]): ckpt for ckpt in ckpt_dir.glob("curve-step=*.ckpt")}
        for step, ckpt in sorted(by_step.items()):
            summary = _test(run, extra, ckpt, directory / "curve", curve_samples)
            points.append({"step": step, "tasks": summary["tasks"], "all": summary["all"]})
            ckpt.unlink()  # a curve point is its numbers; the weights would fill the disk
        atomic_write_text(directory / "curve.json", json.dumps(json_safe(points), indent=1, allow_nan=False))
        times["curve_s"] = time.perf_counter() - start
    if run.knockout:
        from tagmoe_lit.knockout import main as knockout

        start = time.perf_counter()
        knockout([*_seeded(run, extra), "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir",
                  str(directory / "knockout"), "--ckpt_path", str(final)])
        shutil.move(str(ckpt_dir / "knockout.json"), directory / "knockout.json")
        (ckpt_dir / "knockout.md").unlink()
        times["knockout_s"] = time.perf_counter() - start
    return {**times, "steps": steps, "torch_threads": torch.get_num_threads(), "checkpoint": str(final)}


def run_study(preset: Preset, out: Path, extra: list[str]) -> list[Run]:
    """Every run of `preset` not yet done, in order; returns the runs (all done on return)."""
    runs = preset.runs()
    for i, run in enumerate(runs, 1):
        directory = run_dir(out, run)
        key = fingerprint(run, extra, preset.curves)
        tag = f"[study {preset.name} {i}/{len(runs)}] {run.name}"
        if load_done(directory, key):
            print(f"{tag}: done, skipped")
            continue
        if directory.exists():
            print(f"{tag}: unfinished or made with other configs; deleting {directory} and starting over")
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        print(f"{tag}: fit, test{', curve' if run.curve else ''}{', knockout' if run.knockout else ''} → {directory}", flush=True)
        record = train_and_test(run, directory, extra, preset.curves.every_n_steps, preset.curves.test_samples)
        record.update(fingerprint=key.current, variant=run.variant, seed=run.seed)
        atomic_write_text(directory / "done.json", json.dumps(record, indent=1))
        print(f"{tag}: finished in {sum(v for k, v in record.items() if k.endswith('_s')):.0f} s", flush=True)
    return runs


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m tagmoe_lit study", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="experiments/study/cpu.yaml", help="study preset YAML")
    parser.add_argument("--out", help="where runs live (default: runs/study/<preset name>)")
    parser.add_argument("--report", default="docs/results.md", help="markdown file whose section for this preset is (re)written")
    parser.add_argument("--figures", help="folder for the report's PNGs (default: results/ beside --report)")
    parser.add_argument("--smoke", action="store_true", help="2 steps per run and tiny evaluations: checks the whole suite runs")
    parser.add_argument("--seeds", type=int, nargs="+", help="run only these of the preset's seeds")
    parser.add_argument("--variants", nargs="+", help="run only these of the preset's variants")
    parser.add_argument("--report_only", action="store_true", help="write the report from the finished runs; train nothing")
    known, extra = parser.parse_known_args(argv)
    preset = Preset.load(known.preset)
    out = Path(known.out or f"runs/study/{preset.name}{'_smoke' if known.smoke else ''}")
    extra = [*SMOKE, *extra] if known.smoke else extra
    if known.smoke:
        preset = replace(preset, curves=replace(preset.curves, every_n_steps=1, test_samples=18))
    if not known.report_only:  # --seeds / --variants choose what to train; the report covers every finished run
        chosen = preset.only_variants(known.variants) if known.variants else preset
        run_study(chosen.only_seeds(known.seeds) if known.seeds else chosen, out, extra)
    # late, like `_cli`: `study --help` stays instant (no cycle: the report imports runs.py, never this file)
    from tagmoe_lit.study.report import write_report

    report = Path(known.report)
    return write_report(preset, out, extra, report, Path(known.figures) if known.figures else report.parent / "results")
