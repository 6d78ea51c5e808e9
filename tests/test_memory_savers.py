"""Memory savers are config switches that train on CPU: optimizer choice (8-bit states), a frozen
backbone with only the MoE tail trainable, 8/4-bit frozen layers, and activation checkpointing."""

import copy
from pathlib import Path

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from torch import nn

from tagmoe_lit.cli import TagMoECLI
from tagmoe_lit.module import TagMoEModule
from tagmoe_lit.optim import WarmupCosine, build_optimizer
from tagmoe_lit.quantize import quantize_linears
from helpers import BASE, TINY_MODEL, smoke_args

BNB_LINEARS = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)


def fit(tmp_path: Path, *extra: str) -> TagMoECLI:
    """2 steps of the tiny model, no validation."""
    return TagMoECLI(args=["fit", "--config", str(BASE), *smoke_args(tmp_path), *TINY_MODEL,
                           "--trainer.limit_val_batches", "0", *extra])


def callback(cli: TagMoECLI, kind: type) -> L.Callback:
    return next(c for c in cli.trainer.callbacks if isinstance(c, kind))


@pytest.mark.parametrize("name", ["torch.optim.AdamW", "bitsandbytes.optim.AdamW8bit", "bitsandbytes.optim.PagedAdamW8bit"])
def test_optimizer_is_chosen_by_class_path_and_8bit_states_are_bytes(name, tmp_path):
    """bitsandbytes keeps 8-bit states for tensors of ≥ 4096 elements; paged ones run unpaged on CPU.
    A class swap keeps base.yaml's lr, betas and weight decay (same-named init_args)."""
    cli = fit(tmp_path, "--model.optimizer", name)
    opt = cli.trainer.optimizers[0]
    assert f"{type(opt).__module__}.{type(opt).__name__}".endswith(name.rsplit(".", 1)[1]) and cli.trainer.global_step == 2
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["weight_decay"] == 0.0
    big = next(p for p in cli.model.parameters() if p.requires_grad and p.numel() >= 4096)
    state_dtype = (opt.state[big]["state1"] if "8bit" in name else opt.state[big]["exp_avg"]).dtype
    assert state_dtype == (torch.uint8 if "8bit" in name else torch.float32)


def test_any_optimizer_takes_only_its_own_arguments(tmp_path):
    """SGD has no betas: it gets lr and weight decay from base.yaml and its own momentum, and trains."""
    cli = fit(tmp_path, "--model.optimizer", "torch.optim.SGD", "--model.optimizer.init_args.momentum", "0.9")
    opt = cli.trainer.optimizers[0]
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.9 and "betas" not in opt.defaults
    assert opt.param_groups[0]["initial_lr"] == 3e-3 and cli.trainer.global_step == 2


def test_unknown_optimizer_or_option_values_are_refused_in_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        fit(tmp_path, "--model.optimizer", "torch.optim.Adamw")
    assert exit_.value.code != 0 and "torch.optim.Adamw" in capsys.readouterr().err
    with pytest.raises(TypeError, match=r"model.optimizer built a object, not a torch.optim.Optimizer; give the class_path"):
        build_optimizer(lambda params: object(), [], WarmupCosine())
    with pytest.raises(ValueError, match=r"trainable='moe' is unknown.*quantize_frozen='int4' is unknown"):
        TagMoEModule(trainable="moe", quantize_frozen="int4")


class Watch(L.Callback):
    """Records the parameters before training, which got a gradient, and the optimizer's parameters."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.with_grad: set[str] = set()
        self.in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}

    def on_after_backward(self, trainer, pl_module) -> None:
        self.with_grad |= {n for n, p in pl_module.named_parameters() if p.grad is not None}


def test_moe_tail_trains_only_experts_routers_tag_embedder_and_head(tmp_path):
    cli = fit(tmp_path, "--model.trainable", "moe_tail", "--trainer.callbacks+=test_memory_savers.Watch")
    watch, model = callback(cli, Watch), cli.model
    tail = {f"backbone.{n}" for n, _ in model.backbone.named_parameters() if ".img_mlp." in n}
    tail |= {n for n, _ in model.named_parameters() if n.startswith(("tag_embedder.", "head."))}
    assert any(".router." in n for n in tail) and any(".experts." in n for n in tail)
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} == tail == watch.with_grad
    assert watch.in_optimizer == {id(params[n]) for n in tail}
    moved = {n for n, p in params.items() if not torch.equal(p.detach(), watch.before[n])}
    assert moved <= tail and any(".experts." in n for n in moved)  # frozen parameters are untouched


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_frozen_layers_train_the_moe_tail(mode, tmp_path):
    """The text encoder and the dense (MoE-free) blocks store 8/4-bit weights; MoE blocks stay exact."""
    torch.manual_seed(0)
    cli = fit(tmp_path, "--model.trainable", "moe_tail", "--model.quantize_frozen", mode,
              "--model.backbone.init_args.num_layers", "3")
    model = cli.model
    assert cli.trainer.global_step == 2
    assert any(isinstance(m, BNB_LINEARS) for m in model.text_encoder.frozen_model().modules())
    dense, moe = model.backbone.blocks[0], model.backbone.blocks[-1]
    assert not any(type(m) is nn.Linear for m in dense.modules()) and any(isinstance(m, BNB_LINEARS) for m in dense.modules())
    assert not any(isinstance(m, BNB_LINEARS) for m in moe.modules())


def test_quantizing_keeps_outputs_close_and_refuses_trainable_modules():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16)).requires_grad_(False)
    x = torch.randn(8, 64)
    ref = net(x)
    for mode, tol in (("int8", 0.05), ("nf4", 0.3)):
        quantized = copy.deepcopy(net)
        assert quantize_linears(quantized, mode) == 2
        assert (quantized(x) - ref).abs().max() < tol * ref.abs().max(), mode
    with pytest.raises(ValueError, match=r"Only frozen modules can be quantized, but 0.weight .*requires grad"):
        quantize_linears(nn.Sequential(nn.Linear(4, 4)), "int8")
    with pytest.raises(ValueError, match=r"Unknown quantization mode 'int4'"):
        quantize_linears(net, "int4")


class CountsAtStep(L.Callback):
    """Expert counts of the step, read before the module consumes them (callback hooks run first)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.counts = [layer.counts.step_total().sum().item() for layer in pl_module.moe_layers]


def test_activation_checkpointing_counts_each_token_once(tmp_path):
    """The recompute in backward runs the MoE forward again (DESIGN.md pitfall 8): 2 micro-batches
    of 4 samples × 16 target tokens must count 128 assignments per layer, not 256."""
    cli = fit(tmp_path, "--model.backbone.init_args.gradient_checkpointing", "true", "--trainer.accumulate_grad_batches", "2",
              "--trainer.max_steps", "1", "--trainer.callbacks+=test_memory_savers.CountsAtStep")
    assert callback(cli, CountsAtStep).counts == [2 * 4 * 16] * 2
