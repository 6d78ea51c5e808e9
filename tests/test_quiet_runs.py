"""Runs without a logger, and progress where no bar can be seen (issue 15).

`--trainer.logger false` must work for `fit`, `test` and `predict` with base.yaml's callbacks
(Lightning's `LearningRateMonitor` raised without a logger; the kit's steps aside with one
warning). Under pytest stdout is not a terminal, so `ProgressLines` prints its plain lines.
"""

import re
import warnings
from pathlib import Path

from tagmoe_lit.cli import TagMoECLI
from helpers import BASE, smoke_args

FAST_SAMPLER = ["--model.sampler.steps", "2", "--model.sampler.guidance", "2.0"]


def run(tmp_path: Path, subcommand: str, *extra: str) -> TagMoECLI:
    return TagMoECLI(args=[subcommand, "--config", str(BASE), *smoke_args(tmp_path, 2), "--trainer.logger", "false", *extra])


def test_fit_test_and_predict_run_without_a_logger_and_print_progress_lines(tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = run(tmp_path, "fit", "--trainer.val_check_interval", "2", *FAST_SAMPLER)
    assert fitted.trainer.global_step == 2 and not fitted.trainer.loggers
    no_logger = [w for w in caught if "LearningRateMonitor: this run has no logger" in str(w.message)]
    assert len(no_logger) == 1, [str(w.message) for w in caught]
    out = capsys.readouterr().out
    steps = re.findall(r"^step (\d+)/2  loss (\d+\.\d+)  [\d.]+ steps/s \([\d.]+ s/step\)  elapsed \S+  ETA \S+$", out, re.M)
    assert [s for s, _ in steps] == ["1", "2"], out
    assert "validation batch 1/1" in out and "TensorBoard:" not in out
    ckpt = Path(fitted.trainer.checkpoint_callback.last_model_path)
    assert ckpt.is_file() and not (tmp_path / "tensorboard").exists()

    tested = run(tmp_path, "test", "--ckpt_path", str(ckpt), "--data.test_samples", "4", "--trainer.limit_test_batches", "1", *FAST_SAMPLER)
    assert tested.model.test_summary is not None and (tmp_path / "test_report.json").is_file()
    assert re.search(r"^test batch 1/1  [\d.]+ batches/s \([\d.]+ s/batch\)", capsys.readouterr().out, re.M)

    run(tmp_path, "predict", "--ckpt_path", str(ckpt), "--data.test_samples", "2", *FAST_SAMPLER)
    assert len(list((tmp_path / "predictions").glob("*.png"))) == 2
    assert "predict batch 1/1" in capsys.readouterr().out
