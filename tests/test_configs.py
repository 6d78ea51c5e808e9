"""Every shipped YAML parses and trains 2 steps through the real CLI (litgpt's config-hub test).

Convention: `experiments/base.yaml` stands alone; every other YAML is an overlay composed on top
of it (`--config experiments/base.yaml --config <overlay>`), as the README shows, or on the chain
its `# Use:` comment names (e.g. FSDP2 on top of FSDP), which the tests then use verbatim.

GPU-only YAMLs (`trainer.accelerator: gpu`, DESIGN.md pitfall 15) are parsed, their model built on
the meta device and their wrap class resolved on CPU; their 2-step run carries the `gpu` marker.
Their local folders are placeholders, replaced here by a tiny Qwen-Image release saved by
diffusers (`test_pretrained.qwen_root`), and their manifest by the shipped tiny one.
"""

import re
from pathlib import Path

import pytest
import torch
import yaml

from tagmoe_lit.cli import TagMoECLI
from test_pretrained import pipeline, qwen_root  # noqa: F401  (fixtures: the tiny local Qwen-Image folder)

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "experiments" / "base.yaml"
# The study's presets and budgets (experiments/study/*.yaml) are tested by test_study.py, which runs
# the suite for 2 steps per run; its variant overlays (experiments/study/variants/) are plain overlays.
CONFIGS = sorted(p for p in ROOT.glob("experiments/**/*.yaml") if p.parent != ROOT / "experiments" / "study")


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
    """The --config chain of a YAML: the one its `# Use:` comment shows, else base.yaml + it."""
    use = re.search(r"^# Use: (.*)$", path.read_text().replace("\\\n#", " "), re.M)  # "\\" continues a line
    chain = re.findall(r"--config (\S+)", use.group(1)) if use else []
    if chain:
        assert chain[-1] == path.relative_to(ROOT).as_posix(), f"{path.name}: its Use line ends with {chain[-1]}"
        return [arg for c in chain for arg in ("--config", str(ROOT / c))]
    return ["--config", str(BASE)] + ([] if path == BASE else ["--config", str(path)])


def gpu_only(path: Path) -> bool:
    chain = config_args(path)[1::2]
    return any((yaml.safe_load(Path(c).read_text()) or {}).get("trainer", {}).get("accelerator") == "gpu" for c in chain)


GPU_CONFIGS = [p for p in CONFIGS if gpu_only(p)]
CPU_CONFIGS = [p for p in CONFIGS if p not in GPU_CONFIGS]


def local_folders(path: Path, qwen_root: Path) -> list[str]:
    """Point a GPU YAML's placeholder folders (and starting weights, where its chain sets them) and
    manifest at the tiny local release and manifest."""
    chain = config_args(path)[1::2]
    weights = any(re.search(r"^  init_weights: /", Path(c).read_text(), re.M) for c in chain)
    return [
        "--model.codec.init_args.pretrained_path", str(qwen_root),
        "--model.text_encoder.init_args.pretrained_path", str(qwen_root),
        *(["--model.init_weights", str(qwen_root)] if weights else []),
        "--data.init_args.manifests", f"[{ROOT / 'experiments/data/synthtag_tiny/manifest.jsonl'}]",
        "--data.init_args.schema", "synthtag",
        "--data.init_args.max_area", "1024",
        "--data.init_args.val_fraction", "0.25",
    ]


class ParseOnly(TagMoECLI):
    """Parse and validate a config without building the Trainer (a GPU Trainer cannot exist on CPU)."""

    def instantiate_classes(self) -> None:
        pass


def test_every_config_is_found():
    names = {p.relative_to(ROOT / "experiments").as_posix() for p in CONFIGS}
    assert {"base.yaml", "dense.yaml", "moe_agnostic.yaml"} <= names


@pytest.mark.parametrize("path", CPU_CONFIGS, ids=[p.relative_to(ROOT).as_posix() for p in CPU_CONFIGS])
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


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[p.relative_to(ROOT).as_posix() for p in GPU_CONFIGS])
def test_gpu_config_builds_full_qwen_image_on_meta_and_resolves_its_wrap_class(path, qwen_root):
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    cli = ParseOnly(args=[*config_args(path), *local_folders(path, qwen_root)], run=False)
    init = cli.parser.instantiate_classes(cli.config)
    model, strategy = init.model, init.trainer.strategy
    assert cli.config.trainer.num_nodes >= 1 and cli.config.trainer.precision == "bf16-mixed"
    model.configure_model()
    params = [p for part in (model.backbone, model.tag_embedder, model.head) for p in part.parameters()]
    assert params and all(p.is_meta for p in params), "the full model must not be allocated on CPU"
    blocks = model.backbone.blocks
    assert len(blocks) == 60 and blocks[0].img_mlp.net[2].out_features == 3072 == 24 * 128
    assert [i for i, b in enumerate(blocks) if b.img_mlp in model.moe_layers] == list(range(50, 60))
    layer = model.moe_layers[0]
    assert (layer.num_experts, layer.top_k, layer.experts.b1_EH) == (4, 1, None)
    assert tuple(model.backbone.transformer.pos_embed.axes_dim) == (16, 56, 56)
    if hasattr(strategy, "kwargs"):  # FSDPStrategy: wraps and checkpoints by the block class
        policies = (strategy.kwargs["auto_wrap_policy"], strategy._activation_checkpointing_kwargs["auto_wrap_policy"])
        assert all(p._module_classes == {QwenImageTransformerBlock} for p in policies)
        assert isinstance(blocks[0], QwenImageTransformerBlock)
    else:  # ModelParallelStrategy: configure_model's parallelize shards every block
        assert model.activation_checkpointing and type(strategy).__name__ == "ModelParallelStrategy"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[p.relative_to(ROOT).as_posix() for p in GPU_CONFIGS])
def test_gpu_config_trains_two_steps(path, tmp_path, qwen_root):
    """The real strategy on one GPU, the model shrunk to the tiny release's sizes and built for real."""
    shrink = ["--trainer.devices", "1", "--trainer.num_nodes", "1", "--model.meta_init", "false",
              "--model.backbone.init_args.num_layers", "3", "--model.backbone.init_args.num_attention_heads", "2",
              "--model.backbone.init_args.attention_head_dim", "16", "--model.backbone.init_args.axes_dims_rope", "[4, 6, 6]",
              "--model.backbone.init_args.moe_blocks", "2"]
    smoke = [a for a in smoke_args(tmp_path) if not a.startswith("--data.")]
    cli = TagMoECLI(args=["fit", *config_args(path), *local_folders(path, qwen_root), *shrink, *smoke,
                          "--data.init_args.batch_size", "2", "--data.init_args.val_samples", "4"])
    assert cli.trainer.global_step == 2
