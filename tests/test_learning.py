"""Slow: the shipped base config learns — a short real fit cuts the held-out flow loss (make test-slow)."""

import pytest

from helpers import BASE, scalars
from tagmoe_lit.cli import TagMoECLI


@pytest.mark.slow
def test_base_config_learns_in_80_steps(tmp_path):
    cli = TagMoECLI(args=["fit", "--config", str(BASE),
                          "--trainer.max_steps", "80", "--trainer.val_check_interval", "80",
                          "--trainer.enable_progress_bar", "false",
                          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
                          "--data.val_samples", "36"])
    flow = dict(scalars(cli.trainer.log_dir)["val/flow_fixed"])
    assert set(flow) == {0, 79}, "step-0 reference and the final validation are both logged"
    assert flow[79] <= 0.7 * flow[0], f"held-out flow loss {flow[0]:.3f} → {flow[79]:.3f}"
