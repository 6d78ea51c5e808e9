"""End to end through the CLI: TensorBoard contents, router swap, exact resume, clear failures."""

from pathlib import Path

import pytest
import torch

from tagmoe_lit.cli import TagMoECLI
from tagmoe_lit.moe import MLPRouter
from tagmoe_lit.identity import CheckpointMismatchError
from helpers import BASE, checkpoint_weights, smoke_args


def fit(tmp_path: Path, *extra: str, steps: int = 2) -> TagMoECLI:
    return TagMoECLI(args=["fit", "--config", str(BASE), *smoke_args(tmp_path, steps), *extra])


def test_router_swap_from_the_command_line_trains(tmp_path):
    cli = fit(tmp_path, "--model.backbone.init_args.moe.init_args.router", "tagmoe_lit.moe.MLPRouter",
              "--model.backbone.init_args.moe.init_args.router.init_args.hidden", "16")
    routers = [layer.router for layer in cli.model.backbone.moe_layers]
    assert all(isinstance(r, MLPRouter) and r.net[0].out_features == 16 for r in routers)
    assert cli.trainer.global_step == 2


def test_resume_is_bit_exact(tmp_path):
    straight = fit(tmp_path / "a", "--trainer.limit_val_batches", "0", steps=6)
    half = fit(tmp_path / "b", "--trainer.limit_val_batches", "0", "--trainer.callbacks+=helpers.StopAt",
               "--trainer.callbacks.step", "3", steps=6)
    assert half.trainer.global_step == 3
    first = Path(half.trainer.checkpoint_callback.last_model_path)
    resumed = fit(tmp_path / "b", "--trainer.limit_val_batches", "0", "--ckpt_path", str(first), steps=6)
    assert resumed.trainer.global_step == 6
    a = checkpoint_weights(Path(straight.trainer.checkpoint_callback.last_model_path))
    b = checkpoint_weights(Path(resumed.trainer.checkpoint_callback.last_model_path))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_aux_free_bias_moves_each_step_and_survives_resume(tmp_path):
    router = ["--model.backbone.init_args.moe.init_args.router", "tagmoe_lit.moe.AuxFreeBiasRouter",
              "--model.backbone.init_args.moe.init_args.router.init_args.update_rate", "0.01",
              "--trainer.limit_val_batches", "0"]
    straight = fit(tmp_path / "a", *router, steps=4)
    half = fit(tmp_path / "b", *router, "--trainer.callbacks+=helpers.StopAt", "--trainer.callbacks.step", "2", steps=4)
    resumed = fit(tmp_path / "b", *router, "--ckpt_path", half.trainer.checkpoint_callback.last_model_path, steps=4)
    a = checkpoint_weights(Path(straight.trainer.checkpoint_callback.last_model_path))
    b = checkpoint_weights(Path(resumed.trainer.checkpoint_callback.last_model_path))
    biases = [k for k in a if k.endswith("router.expert_bias")]
    assert len(biases) == 2
    for k in biases:
        assert a[k].abs().sum() > 0 and torch.equal(a[k], b[k]), k
    assert checkpoint_weights(Path(half.trainer.checkpoint_callback.last_model_path))[biases[0]].abs().max() <= 2 * 0.01 + 1e-6


def test_checkpoint_from_another_expert_count_is_refused_clearly(tmp_path):
    done = fit(tmp_path, "--trainer.limit_val_batches", "0", steps=1)
    ckpt = done.trainer.checkpoint_callback.last_model_path
    with pytest.raises(CheckpointMismatchError, match=r"num_experts: checkpoint 4 vs config 2.*trained with"):
        TagMoECLI(args=["validate", "--config", str(BASE), *smoke_args(tmp_path),
                        "--model.backbone.init_args.moe.init_args.num_experts", "2", "--ckpt_path", ckpt])


def test_diverging_loss_stops_with_one_clear_error(tmp_path):
    with pytest.raises(FloatingPointError, match=r"Training loss is (nan|inf) at step \d+ .*lower the optimizer's lr \(model.optimizer.init_args.lr\)"):
        fit(tmp_path, "--model.optimizer.init_args.lr", "1e30", "--trainer.gradient_clip_val", "null", "--model.warmup_steps", "1", steps=6)


def test_wrong_config_key_exits_nonzero_naming_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        fit(tmp_path, "--model.lamda_align", "0.5")
    assert err.value.code != 0
    assert "lamda_align" in capsys.readouterr().err


def test_help_and_print_config_show_the_swappable_components(capsys):
    with pytest.raises(SystemExit) as err:
        TagMoECLI(args=["fit", "--help"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    for key in ("--model.backbone", "--model.tag_embedder", "--model.head", "--model.text_encoder", "--model.codec", "--data.schema"):
        assert key in out, key
    with pytest.raises(SystemExit) as err:
        TagMoECLI(args=["fit", "--config", str(BASE), "--print_config"])
    assert err.value.code == 0
    printed = capsys.readouterr().out
    assert "tagmoe_lit.moe.MoELayer" in printed and "tagmoe_lit.moe.LinearRouter" in printed
