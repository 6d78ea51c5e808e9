"""Every shipped YAML parses and trains 2 steps through the real CLI (litgpt's config-hub test).

Convention: `experiments/base.yaml` stands alone; every other YAML is an overlay composed on top
of it (`--config experiments/base.yaml --config <overlay>`), as the README shows.
"""

from pathlib import Path

import pytest

from tagmoe_lit.cli import TagMoECLI

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "experiments" / "base.yaml"
CONFIGS = sorted(ROOT.glob("experiments/**/*.yaml"))


def smoke_args(tmp_path, steps: int = 2) -> list[str]:
    """Shrink a run to seconds: small batches, no sanity pass, logs under tmp_path."""
    return [
        "--trainer.max_steps", str(steps),
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.batch_size", "4",
        "--data.val_samples", "4",
    ]


def config_args(path: Path) -> list[str]:
    return ["--config", str(BASE)] + ([] if path == BASE else ["--config", str(path)])


def test_every_config_is_found():
    names = {p.relative_to(ROOT / "experiments").as_posix() for p in CONFIGS}
    assert {"base.yaml", "dense.yaml", "moe_agnostic.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.relative_to(ROOT).as_posix() for p in CONFIGS])
def test_config_trains_two_steps(path, tmp_path):
    cli = TagMoECLI(args=["fit", *config_args(path), *smoke_args(tmp_path)])
    assert cli.trainer.global_step == 2
    assert cli.model.schema.name == cli.datamodule.schema.name


def test_variants_differ_from_base_only_in_config(tmp_path):
    dense = TagMoECLI(args=[*config_args(ROOT / "experiments/dense.yaml"), *smoke_args(tmp_path)], run=False)
    agnostic = TagMoECLI(args=[*config_args(ROOT / "experiments/moe_agnostic.yaml"), *smoke_args(tmp_path)], run=False)
    for cli in (dense, agnostic):
        cli.model.configure_model()
    assert not dense.model.has_moe and dense.model.tag_embedder is None
    assert agnostic.model.has_moe and agnostic.model.lambda_align == 0.0
