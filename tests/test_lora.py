"""LoRA (`model.lora`): adapters on attention and experts learn while the backbone stays frozen; a
fresh adapter changes nothing (also after meta-device materialization); merging keeps the forward;
resume is bit-exact with dropout on; the settings are part of the checkpoint identity; adapter-only
checkpoints round-trip; QLoRA trains on nf4 layers; `params` counts what learns."""

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers import BASE, TINY_MODEL, checkpoint_weights, smoke_args, tiny_batch, tiny_module, transformer_output
from tagmoe_lit.__main__ import run
from tagmoe_lit.cli import TagMoECLI
from tagmoe_lit.distributed.materialize import materialize_
from tagmoe_lit.identity import CheckpointMismatchError
from tagmoe_lit.lora import ExpertLoRA, LinearLoRA, LoRA, adapters, load_adapter, merge_lora_
from tagmoe_lit.moe import StackedExperts

ALL = LoRA(rank=4, alpha=8.0, targets=["attention", "ffn", "router", "experts"])
LORA_ARGS = ["--model.lora.rank", "4", "--model.lora.alpha", "8", "--model.lora.dropout", "0.1",
             "--model.lora.targets", "[attention, experts]"]


def fit(tmp_path: Path, *extra: str, steps: int = 2) -> TagMoECLI:
    return TagMoECLI(args=["fit", "--config", str(BASE), *smoke_args(tmp_path, steps), *TINY_MODEL,
                           "--trainer.limit_val_batches", "0", *LORA_ARGS, *extra])


def output(module, batch) -> torch.Tensor:
    module.eval()
    sigma = torch.full((len(batch["instruction"]),), 0.5)
    noise = module.fixed_noise(batch, "eval")
    with torch.no_grad():
        terms = module.loss_terms(batch, sigma, noise, *(torch.zeros(len(sigma), dtype=torch.bool),) * 2, routing_terms=False)
    return terms["flow"]


def randomize_(module) -> None:
    """Adapters as after training: B no longer zero."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for adapter in adapters(module):
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_fresh_adapters_change_nothing_and_only_adapters_head_and_tag_embedder_learn():
    plain, adapted = tiny_module(), tiny_module(lora=ALL)
    batch = tiny_batch(plain)
    torch.testing.assert_close(output(adapted, batch), output(plain, batch), rtol=0, atol=0)
    found = adapters(adapted)
    assert sum(isinstance(a, ExpertLoRA) for a in found) == 2 and sum(isinstance(a, LinearLoRA) for a in found) == 22
    adapted.train()
    draws = adapted.training_draws(batch["target"], 0)
    adapted.loss_terms(batch, draws.sigma_B, draws.noise_BTP, draws.drop_text_B, draws.drop_ref_B)["loss"].backward()
    learns = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert learns == {n for n, p in adapted.named_parameters() if ".lora." in n or n.startswith(("tag_embedder.", "head."))}
    grads = {n: p.grad for n, p in adapted.named_parameters() if p.grad is not None}
    assert set(grads) <= learns
    assert any(".experts.lora.B1_ERH" in n and g.abs().sum() > 0 for n, g in grads.items())  # experts learn
    assert any(".attn.to_q.lora.B" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_merging_keeps_the_forward_and_the_names_of_a_model_without_lora():
    adapted = tiny_module(lora=ALL)
    randomize_(adapted)
    batch = tiny_batch(adapted)
    before = output(adapted, batch)
    assert merge_lora_(adapted) == 24 and not adapters(adapted)
    torch.testing.assert_close(output(adapted, batch), before, rtol=1e-5, atol=1e-6)
    assert adapted.state_dict().keys() == tiny_module().state_dict().keys()


def test_adapters_built_on_meta_start_at_zero_when_materialized():
    module = tiny_module(lora=ALL, meta_init=True)
    assert all(p.is_meta for p in module.backbone.parameters())
    materialize_(module, "cpu")
    for adapter in adapters(module):
        zero = [adapter.B] if isinstance(adapter, LinearLoRA) else [adapter.B1_ERH, adapter.B2_ERD]
        assert all(torch.count_nonzero(b) == 0 for b in zero)
        assert all(torch.count_nonzero(a) > 0 for a in ([adapter.A] if isinstance(adapter, LinearLoRA) else [adapter.A1_EDR]))


def test_resume_with_lora_and_dropout_is_bit_exact(tmp_path):
    straight = fit(tmp_path / "a", steps=4)
    half = fit(tmp_path / "b", "--trainer.callbacks+=helpers.StopAt", "--trainer.callbacks.step", "2", steps=4)
    resumed = fit(tmp_path / "b", "--ckpt_path", half.trainer.checkpoint_callback.last_model_path, steps=4)
    a = checkpoint_weights(Path(straight.trainer.checkpoint_callback.last_model_path))
    b = checkpoint_weights(Path(resumed.trainer.checkpoint_callback.last_model_path))
    assert a.keys() == b.keys() and any(".lora." in k for k in a)
    moved = [k for k in a if ".lora.B" in k and torch.count_nonzero(a[k])]
    assert moved, "the adapters did not learn"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_the_lora_settings_are_part_of_the_checkpoint_identity(tmp_path):
    cli = fit(tmp_path)
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    assert torch.load(ckpt, weights_only=True)["tagmoe"]["lora"]["rank"] == 4
    with pytest.raises(CheckpointMismatchError, match="lora: checkpoint"):
        TagMoECLI(args=["fit", "--config", str(BASE), *smoke_args(tmp_path / "c", 3), *TINY_MODEL, "--ckpt_path", ckpt])


def test_adapter_only_checkpoints_round_trip_and_export_merges(tmp_path):
    cli = fit(tmp_path)
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    config = ["--config", str(BASE), *TINY_MODEL, *LORA_ARGS]
    run(["convert", "export", *config, "--ckpt_path", ckpt, "--dst", str(tmp_path / "adapter"), "--adapter_only"])
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and "transformer_blocks.0.attn.to_q" in saved["target_modules"]
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight" in tensors
    assert any(k.endswith("experts.lora.B1_ERH") for k in tensors)
    fresh = tiny_module(lora=LoRA(rank=4, alpha=8.0, dropout=0.1, targets=["attention", "experts"]))
    load_adapter(fresh.backbone.transformer, fresh.lora, tmp_path / "adapter")
    trained = cli.model.backbone.transformer
    for name, p in fresh.backbone.transformer.named_parameters():
        if ".lora." in name:
            torch.testing.assert_close(p, trained.get_parameter(name), rtol=0, atol=0)
    with pytest.raises(CheckpointMismatchError, match="made with model.lora"):
        load_adapter(tiny_module(lora=ALL).backbone.transformer, ALL, tmp_path / "adapter")

    with pytest.raises(SystemExit, match=r"has LoRA adapters.*--merge_lora .* or --adapter_only"):
        run(["convert", "export", *config, "--ckpt_path", ckpt, "--dst", str(tmp_path / "unmerged")])
    run(["convert", "export", *config, "--ckpt_path", ckpt, "--dst", str(tmp_path / "merged"), "--merge_lora"])
    from tagmoe_lit import TagMoEQwenImageTransformer2DModel

    merged = TagMoEQwenImageTransformer2DModel.from_pretrained(tmp_path / "merged")
    for layer in cli.model.moe_layers:
        layer.set_routing_inputs()  # the training batch's token mask, not this one's
    torch.testing.assert_close(transformer_output(merged), transformer_output(trained), rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "merged" / "tagmoe_config.json").read_text())["lora"] is None


def test_qlora_trains_adapters_on_nf4_layers(tmp_path):
    cli = fit(tmp_path, "--model.quantize_frozen", "nf4")
    assert cli.trainer.global_step == 2
    block = cli.model.backbone.blocks[0]
    assert isinstance(block.attn.to_q, bnb.nn.Linear4bit) and isinstance(block.attn.to_q.lora, LinearLoRA)
    assert type(block.img_mlp.router.gate) is nn.Linear  # routing stays in full precision
    assert isinstance(block.img_mlp.experts, StackedExperts) and torch.count_nonzero(block.attn.to_q.lora.B) > 0


def test_params_counts_what_learns():
    rows = run(["params", "--config", str(BASE), *TINY_MODEL, *LORA_ARGS])
    (counts,) = rows.values()
    plain = run(["params", "--config", str(BASE), *TINY_MODEL])
    (base,) = plain.values()
    assert counts["trainable"] < base["trainable"] and counts["total"] > base["total"]
    assert counts["total"] - base["total"] == counts["trainable"] - counts["trainable_outside_backbone"]


@pytest.mark.parametrize(("option", "message"), [
    (["--model.lora.rank", "0"], "rank=0 must be at least 1"),
    (["--model.lora.targets", "[attention, mlp]"], "must be a non-empty list of"),
    (["--model.trainable", "moe_tail"], "trainable: moe_tail trains the experts whole, so LoRA cannot also target them"),
])
def test_bad_lora_settings_are_one_sentence(option, message, tmp_path, capsys):
    from tagmoe_lit.__main__ import main

    assert main(["fit", "--config", str(BASE), *smoke_args(tmp_path), *TINY_MODEL, *LORA_ARGS, *option]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--model.optimizer", "bitsandbytes.optim.AdamW8bit"], ["--trainer.precision", "bf16-mixed"]],
                         ids=["adamw8bit", "bf16"])
def test_lora_trains_with_8bit_optimizer_states_and_in_bf16(extra, tmp_path):
    cli = fit(tmp_path, *extra)
    bs = [p for n, p in cli.model.named_parameters() if n.endswith((".lora.B", ".lora.B1_ERH"))]
    moved = [bool(torch.count_nonzero(b)) for b in bs]  # the last block's text stream reaches no output: its stay 0
    assert bs and all(torch.isfinite(b).all() for b in bs) and sum(moved) >= 0.8 * len(moved)
    assert all(p.dtype == torch.float32 for p in cli.model.backbone.moe_layers[0].router.parameters())


def test_moe_tail_trains_the_experts_whole_beside_adapters_on_the_frozen_dense_part(tmp_path):
    cli = fit(tmp_path, "--model.trainable", "moe_tail", "--model.lora.targets", "[attention]", "--model.quantize_frozen", "nf4",
              "--model.backbone.init_args.num_layers", "3")
    learns = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert any(".experts.w1_EDH" in n for n in learns) and any(".attn.to_q.lora.B" in n for n in learns)
    assert not any(n.endswith(".attn.to_q.weight") for n in learns)
    dense = cli.model.backbone.blocks[0]  # quantized (moe_tail's rule), with adapters on top
    assert isinstance(dense.attn.to_q, bnb.nn.Linear4bit) and torch.count_nonzero(dense.attn.to_q.lora.B) > 0


def test_lora_fine_tunes_from_init_weights_and_leaves_the_loaded_backbone_untouched(tmp_path):
    """Base weight names are the model's own: `init_weights` (a `convert export` directory) fills
    the backbone of a LoRA model as of a plain one, and LoRA training never moves it."""
    base = TagMoECLI(args=["fit", "--config", str(BASE), *smoke_args(tmp_path / "base"), *TINY_MODEL,
                           "--trainer.limit_val_batches", "0"])
    config = ["--config", str(BASE), *TINY_MODEL]
    run(["convert", "export", *config, "--ckpt_path", base.trainer.checkpoint_callback.last_model_path, "--dst", str(tmp_path / "export")])
    tuned = fit(tmp_path / "lora", "--model.init_weights", str(tmp_path / "export"))
    start = checkpoint_weights(Path(base.trainer.checkpoint_callback.last_model_path))
    after = checkpoint_weights(Path(tuned.trainer.checkpoint_callback.last_model_path))
    backbone = [k for k in start if k.startswith("backbone.")]
    assert backbone and all(torch.equal(after[k], start[k]) for k in backbone)
    assert any(".lora.B" in k and torch.count_nonzero(after[k]) for k in after)
