"""`benchmarks/reference_reading.py`, the diagnostic that picks `make fit`'s defaults, on a 1-step checkpoint."""

import sys
from pathlib import Path

from tagmoe_lit.cli import TagMoECLI
from helpers import BASE, smoke_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_reading import reference_reading  # noqa: E402


def test_reference_reading_is_exact_without_noise_and_low_for_an_untrained_model_at_high_noise(tmp_path):
    done = TagMoECLI(args=["fit", "--config", str(BASE), *smoke_args(tmp_path, steps=1), "--trainer.limit_val_batches", "0"])
    ckpt = done.trainer.checkpoint_callback.last_model_path
    cli = TagMoECLI(args=["--config", str(BASE), *smoke_args(tmp_path), "--data.test_samples", "18",
                          "--trainer.logger", "false"], run=False)
    table = reference_reading(cli, ckpt, samples=18, sigmas=[0.0, 0.95])
    assert set(table[0.0]) == {"all", *cli.datamodule.task_names}, "every task of the first 18 test samples has a row"
    assert all(share == 1.0 for share in table[0.0].values()), "at σ = 0, x̂0 is the target itself"
    assert table[0.95]["all"] < 0.2, "one training step cannot predict the target from almost pure noise"
