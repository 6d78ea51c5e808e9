"""`model.init_weights` and `model.meta_init`: a sharded-ready build that starts from real weights or from scratch.

A meta-device build is materialized where the strategy puts it, with every module's declared init
(`parallel.materialize_`), and `init_weights` fills it at the first loop start from a dense diffusers
Qwen-Image folder (experts upcycled from the FFNs) or a `convert export` directory. Each run here goes
through the real CLI on the tiny model of `helpers.common` and is compared with an eager build:
the pretrained backbone (`backbone.pretrained_path`) or the exported module itself.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.normalization import RMSNorm
from safetensors.torch import save_file
from torch import nn

from tagmoe_lit.cli import TagMoECLI
from tagmoe_lit.convert.export import export
from tagmoe_lit.identity import CheckpointMismatchError
from tagmoe_lit.module import TagMoEModule
from tagmoe_lit.distributed import uninitializable
from helpers import FSDP2, assert_same_run, common, last_weights, single, tiny_batch, tiny_module, torchrun

META = ["--model.meta_init", "true"]
NOISE = ["--model.backbone.init_args.upcycle_noise", "0.05"]  # upcycling draws must follow the backbone's seed too


class StartState(L.Callback):
    """The module as the run's first training step sees it (after every on_train_start hook)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not hasattr(self, "state"):
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.rms_weights = [m.weight.detach().clone() for m in pl_module.modules() if isinstance(m, RMSNorm)]
            self.gate_stds = [layer.router.gate.weight.std().item() for layer in pl_module.moe_layers]
            self.counts = [layer.counts.step_total() for layer in pl_module.moe_layers]


def cli(subcommand: str, tmp: Path, *extra: str) -> TagMoECLI:
    """The tiny model through the real CLI, 4 samples a batch, one validation batch."""
    return TagMoECLI(args=[subcommand, *common(tmp, 4), "--data.val_samples", "4", "--trainer.limit_val_batches", "1", *extra])


def eager(tmp: Path, *extra: str) -> TagMoEModule:
    """The same config built in this process without a run (no Trainer: eager weights on CPU)."""
    module = TagMoECLI(args=[*common(tmp, 4), *extra], run=False).model
    module.configure_model()
    return module


def callback(run: TagMoECLI, kind: type) -> L.Callback:
    return next(c for c in run.trainer.callbacks if isinstance(c, kind))


def left_as_built(key: str) -> bool:
    """What a dense release cannot give: routers, tag embedder, head."""
    return ".router." in key or key.startswith(("tag_embedder.", "head."))


def forward(module: TagMoEModule) -> dict[str, torch.Tensor]:
    """Loss terms at fixed σ, noise and conditioning (no dropout)."""
    batch = tiny_batch(module)
    x0, _ = module.encode_images(batch)
    no = torch.zeros(4, dtype=torch.bool)
    with torch.no_grad():
        terms = module.loss_terms(batch, torch.full((4,), 0.5), torch.randn(x0.shape, generator=torch.Generator().manual_seed(5)), no, no)
    return {k: terms[k] for k in ("loss", "flow_per_sample", "align")}


def dense_release(root: Path, module: TagMoEModule) -> Path:
    """A release root whose `transformer/` is a dense diffusers Qwen-Image (random weights) of `module`'s sizes."""
    torch.manual_seed(7)
    QwenImageTransformer2DModel.from_config(module.backbone.transformer.config).save_pretrained(root / "transformer")
    return root


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> tuple[Path, TagMoEModule]:
    """A `convert export` directory of an eagerly built tiny module, and that module."""
    tmp = tmp_path_factory.mktemp("kit")
    module = eager(tmp)
    export(module, tmp / "exported")
    return tmp / "exported", module


def test_meta_init_from_a_dense_diffusers_folder_equals_the_eager_pretrained_backbone(tmp_path):
    """Dense weights and upcycled experts (with upcycling noise) equal `backbone.pretrained_path`'s
    build; routers, tag embedder and head keep the model's init, and with them copied the forwards agree."""
    root = dense_release(tmp_path / "qwen", eager(tmp_path / "shape"))
    reference = eager(tmp_path / "eager", "--model.backbone.init_args.pretrained_path", str(root), *NOISE)
    run = cli("validate", tmp_path / "meta", *META, *NOISE, "--model.init_weights", str(root))
    loaded = run.model
    assert "val/flow_fixed" in run.trainer.callback_metrics  # validation saw the loaded weights
    mine, theirs = loaded.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys()
    for k, v in theirs.items():
        if not left_as_built(k):
            torch.testing.assert_close(mine[k], v, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    experts = loaded.moe_layers[0].experts.w1_EDH
    assert not torch.equal(experts[0], experts[1])  # the noise was applied, as in the eager build
    reference.load_state_dict({k: v for k, v in mine.items() if left_as_built(k)}, strict=False)
    a, b = forward(loaded), forward(reference)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_meta_init_from_a_convert_export_directory_equals_the_exported_module(kit, tmp_path):
    directory, exported = kit
    loaded = cli("validate", tmp_path, *META, "--model.init_weights", str(directory)).model
    mine = loaded.state_dict()
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(mine[k], v, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    a, b = forward(loaded), forward(exported)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_ckpt_path_wins_over_init_weights(kit, tmp_path):
    """Resuming a meta-built run that names init_weights restores the checkpoint, not the directory."""
    directory, _ = kit
    cli("fit", tmp_path / "first", "--trainer.max_steps", "1")
    saved = last_weights(tmp_path / "first")
    run = cli("fit", tmp_path / "resumed", *META, "--model.init_weights", str(directory), "--trainer.max_steps", "2",
              "--trainer.callbacks+=test_init_weights.StartState", "--ckpt_path", str(next((tmp_path / "first").glob("**/last.ckpt"))))
    start = callback(run, StartState).state
    for k, v in saved.items():
        torch.testing.assert_close(start[k], v, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


def test_meta_init_from_scratch_starts_like_an_eager_build(tmp_path):
    """Every tensor is initialized as the constructors would: RMSNorm weights 1, zero expert counts,
    the routers' normal(0, 0.02) gate (a parent's init after its child's), experts drawn independently
    as in the eager build (one init path, `StackedExperts.reset_parameters`), and the loss is finite."""
    run = cli("fit", tmp_path, *META, "--trainer.max_steps", "1", "--trainer.callbacks+=test_init_weights.StartState")
    start = callback(run, StartState)
    assert all(torch.isfinite(v).all() for v in start.state.values() if v.is_floating_point())
    assert start.rms_weights and all(torch.equal(w, torch.ones_like(w)) for w in start.rms_weights)
    assert all(0.01 < std < 0.03 for std in start.gate_stds), start.gate_stds  # nn.Linear's own init gives ~0.1
    assert all(not c.any() for c in start.counts)
    experts = [v for k, v in start.state.items() if k.endswith(("experts.w1_EDH", "experts.w2_EHD"))]
    built = eager(tmp_path / "eager").state_dict()
    experts_eager = [v for k, v in built.items() if k.endswith(("experts.w1_EDH", "experts.w2_EHD"))]
    for w in (*experts, *experts_eager):  # from scratch, meta and eager alike: no two experts start equal
        assert not any(torch.equal(w[e], w[0]) for e in range(1, len(w))), "experts must start as independent draws"
    assert torch.isfinite(run.trainer.callback_metrics["train/loss"])
    assert not run.model.backbone.transformer.pos_embed.pos_freqs.is_meta


def test_bad_init_weights_are_refused_in_one_error(tmp_path):
    module = tiny_module(init_weights=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"model.init_weights .*nowhere does not exist; point it at"):
        module.setup("fit")  # before a trainer builds the model
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        module.load_init_weights()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No weights in"):
        tiny_module(init_weights=str(tmp_path / "empty")).load_init_weights()
    # one more block, another text width and a key left out: all three kinds in one error
    other = QwenImageTransformer2DModel.from_config({**module.backbone.transformer.config, "num_layers": 3, "joint_attention_dim": 48})
    (tmp_path / "other").mkdir()
    save_file({k: v for k, v in other.state_dict().items() if k != "norm_out.linear.weight"}, tmp_path / "other" / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"transformer: missing norm_out\.linear\.weight; transformer: unexpected "
                       r"transformer_blocks\.2\..*; transformer: wrong shape txt_in\.weight \[32, 48\] vs model \[32, 384\]"):
        tiny_module(init_weights=str(tmp_path / "other")).load_init_weights()


def test_kit_directory_of_another_model_or_a_meta_model_is_refused(kit):
    directory, _ = kit
    other = tiny_module(init_weights=str(directory))  # conftest's tiny model has a 2-pixel codec: other token widths
    with pytest.raises(CheckpointMismatchError, match=r"does not fit this model: backbone: wrong shape backbone\.transformer\.img_in\.weight \[32, 48\] vs model \[32, 12\]"):
        other.load_init_weights()
    with pytest.raises(ValueError, match="on the meta device"):
        tiny_module(meta_init=True, init_weights=str(directory)).load_init_weights()


def test_meta_init_refuses_what_it_would_silently_drop(kit, tmp_path):
    """A backbone pretrained_path a meta build cannot read, upcycling noise for FFNs it does not have, bnb
    quantization of blocks that do not exist yet, and loading a directory into meta tensors (a no-op in
    torch) each stop with one sentence."""
    from functools import partial

    from tagmoe_lit.backbone import QwenImageBackbone
    from tagmoe_lit.convert import load_transformer_dir
    from tagmoe_lit.moe import MoELayer

    release = tmp_path / "release"
    tiny_module().backbone.transformer.save_config(release)  # a meta build reads only the config
    moe = {"moe": partial(MoELayer, num_experts=4), "moe_blocks": 2}
    module = TagMoEModule(backbone=partial(QwenImageBackbone, pretrained_path=str(release), **moe), meta_init=True)
    with pytest.raises(ValueError, match=r"pretrained_path .* would be ignored; set model.init_weights to the same folder"):
        module.configure_model()
    sizes = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "axes_dims_rope": (4, 6, 6)}
    noisy = TagMoEModule(backbone=partial(QwenImageBackbone, upcycle_noise=0.05, **sizes, **moe), meta_init=True)
    with pytest.raises(ValueError, match=r"upcycle_noise / upcycle_reinit would be ignored; set model.init_weights"):
        noisy.configure_model()
    with pytest.raises(ValueError, match="meta_init cannot quantize frozen backbone blocks"):
        tiny_module(meta_init=True, quantize_frozen="int8", trainable="moe_tail")
    meta = tiny_module(meta_init=True)  # built without a trainer: stays on meta
    with pytest.raises(ValueError, match="load_transformer_dir needs a module with real weights"):
        load_transformer_dir(meta, kit[0])


def test_classes_without_an_init_are_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    assert uninitializable(nn.Sequential(nn.Linear(2, 2), Odd(), RMSNorm(4, eps=1e-6))) == ["Odd"]
    assert uninitializable(tiny_module(meta_init=True)) == []


@pytest.mark.slow
@pytest.mark.parametrize("ranks, ep", [(2, 1), (4, 2)], ids=["fsdp2", "fsdp2-ep2"])
def test_fsdp2_from_meta_and_init_weights_equals_one_eager_process(kit, tmp_path, ranks, ep):
    """ModelParallelStrategy (gloo, activation checkpointing), built on meta, sharded (with expert
    parallelism: experts split over 2 of the 4 ranks, then sharded), materialized and filled from the
    export directory (rank 0 reads, tensors broadcast into every shard): the same losses and final
    weights as one eager process loading the same directory."""
    directory, _ = kit
    start = ["--model.init_weights", str(directory)]
    single(tmp_path / "one", *start)
    seconds = torchrun(tmp_path / "many", *FSDP2, *META, *start, "--trainer.strategy.expert_parallel_size", str(ep), ranks=ranks)
    diff = assert_same_run(tmp_path / "one", tmp_path / "many", ranks=ranks)
    print(f"\nFSDP2 (ep {ep}) meta + init_weights {ranks} ranks vs eager 1 rank: max loss difference {diff:.2e}, {seconds:.1f} s")
