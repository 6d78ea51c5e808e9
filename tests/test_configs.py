"""Every shipped YAML parses and trains 2 steps through the real CLI (litgpt's config-hub test).

Convention: each YAML opens with the question it answers and a `# Use:` line with its --config
chain, which the tests use verbatim: `experiments/base.yaml` stands alone, an overlay goes on top of
it (`--config experiments/base.yaml --config <overlay>`), and the full-size model goes with a
strategy overlay (`model/qwen_image.yaml` + `strategy/fsdp.yaml` or `strategy/fsdp2.yaml`).

GPU-only chains (`trainer.accelerator: gpu`, DESIGN.md pitfall 15) are parsed, their model built on
the meta device and their strategy checked on CPU; their 2-step run carries the `gpu` marker.
Their local folders are placeholders, replaced here by a tiny Qwen-Image release saved by
diffusers (conftest's `qwen_root`), and their manifest by the shipped tiny one.
"""

import re
from pathlib import Path

import pytest
import torch
import yaml

from helpers import BASE, ROOT, smoke_args
from tagmoe_lit.cli import ParseOnly, TagMoECLI

# The study's presets and budgets (experiments/study/*.yaml) are tested by test_study.py, which runs
# the suite for 2 steps per run; its variant overlays (experiments/study/variants/) are plain overlays.
CONFIGS = sorted(p for p in ROOT.glob("experiments/**/*.yaml") if p.parent != ROOT / "experiments" / "study")


def use_chain(path: Path) -> list[str]:
    """The --config files of a YAML's `# Use:` line, relative to the repository root."""
    use = re.search(r"^# Use: (.*)$", path.read_text().replace("\\\n#", " "), re.M)  # "\\" continues a line
    return re.findall(r"--config (\S+)", use.group(1)) if use else []


def config_args(path: Path) -> list[str]:
    """The --config chain of a YAML: the one its `# Use:` comment shows (which must name it)."""
    chain = use_chain(path)
    assert path.relative_to(ROOT).as_posix() in chain, f"{path.name}: its Use line {chain} does not name it"
    return [arg for c in chain for arg in ("--config", str(ROOT / c))]


def chain_value(path: Path, section: str, key: str):
    """The value the last file of the chain that sets `section.key` gives it (None if none does)."""
    value = None
    for c in config_args(path)[1::2]:
        part = (yaml.safe_load(Path(c).read_text()) or {}).get(section) or {}
        value = part.get(key, value)
    return value


def gpu_only(path: Path) -> bool:
    return chain_value(path, "trainer", "accelerator") == "gpu"


GPU_CONFIGS = [p for p in CONFIGS if gpu_only(p)]
CPU_CONFIGS = [p for p in CONFIGS if p not in GPU_CONFIGS]


def local_folders(path: Path, qwen_root: Path) -> list[str]:
    """Point a GPU chain's placeholder folders (and starting weights, where the chain sets them) and
    manifest at the tiny local release and manifest."""
    weights = chain_value(path, "model", "init_weights") is not None
    return [
        "--model.codec.init_args.pretrained_path", str(qwen_root),
        "--model.text_encoder.init_args.pretrained_path", str(qwen_root),
        *(["--model.init_weights", str(qwen_root)] if weights else []),
        "--data.init_args.manifests", f"[{ROOT / 'experiments/data/synthtag_tiny/manifest.jsonl'}]",
        "--data.init_args.schema", "synthtag",
        "--data.init_args.max_area", "1024",
        "--data.init_args.val_fraction", "0.25",
    ]


def test_every_config_is_found():
    names = {p.relative_to(ROOT / "experiments").as_posix() for p in CONFIGS}
    assert {"base.yaml", "dense.yaml", "moe_agnostic.yaml", "model/qwen_image.yaml", "strategy/fsdp.yaml",
            "strategy/fsdp2.yaml"} <= names
    assert {"model/qwen_image.yaml", "strategy/fsdp.yaml", "strategy/fsdp2.yaml"} <= {
        p.relative_to(ROOT / "experiments").as_posix() for p in GPU_CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.relative_to(ROOT).as_posix() for p in CONFIGS])
def test_every_config_says_what_it_answers_and_how_to_use_it(path):
    text = path.read_text()
    assert text.startswith("# ") and "Question" in text.split("\n\n")[0], f"{path.name}: open with the question it answers"
    chain = use_chain(path)
    assert chain and chain[0] == "experiments/base.yaml", f"{path.name}: a `# Use:` chain starting from base.yaml"
    assert all((ROOT / c).is_file() for c in chain), chain


def test_only_base_yaml_configures_the_logger():
    """Overlays set trainer.default_root_dir; the logger block (and its save_dir) is base.yaml's alone."""
    configured = [p.relative_to(ROOT).as_posix() for p in ROOT.glob("experiments/**/*.yaml")
                  if "logger" in ((yaml.safe_load(p.read_text()) or {}).get("trainer") or {})]
    assert configured == ["experiments/base.yaml"]
    assert "save_dir" not in yaml.safe_load(BASE.read_text())["trainer"]["logger"]["init_args"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.relative_to(ROOT).as_posix() for p in CONFIGS])
def test_logs_follow_the_chains_root_dir(path, request):
    local = local_folders(path, request.getfixturevalue("qwen_root")) if path in GPU_CONFIGS else []
    cli = ParseOnly(args=[*config_args(path), *local], run=False)
    trainer = cli.config.trainer
    assert trainer.default_root_dir and trainer.logger.init_args.save_dir == trainer.default_root_dir


def test_root_dir_alone_moves_the_logs_and_an_explicit_save_dir_wins(tmp_path):
    dense = ["--config", str(BASE), "--config", str(ROOT / "experiments/dense.yaml")]
    assert ParseOnly(args=dense, run=False).config.trainer.logger.init_args.save_dir == "runs/dense"
    moved = ParseOnly(args=[*dense, "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert moved.config.trainer.logger.init_args.save_dir == str(tmp_path)
    both = ParseOnly(args=[*dense, "--trainer.default_root_dir", "a", "--trainer.logger.init_args.save_dir", "b"], run=False)
    assert both.config.trainer.logger.init_args.save_dir == "b"
    cli = TagMoECLI(args=["fit", "--config", str(BASE), *smoke_args(tmp_path, steps=1), "--trainer.limit_val_batches", "0"])
    assert Path(cli.trainer.log_dir) == tmp_path / "tensorboard" / "version_0"


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
    assert agnostic.model.has_moe and agnostic.model.objective.lambda_align == 0.0


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[p.relative_to(ROOT).as_posix() for p in GPU_CONFIGS])
def test_gpu_config_builds_full_qwen_image_on_meta_and_configures_its_strategy(path, qwen_root):
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
    from lightning.pytorch.strategies import FSDPStrategy

    from tagmoe_lit.distributed import FSDP2Strategy

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
    if isinstance(strategy, FSDPStrategy):  # FSDP1: Lightning wraps and checkpoints by the block class
        policy = cli.config.trainer.strategy.init_args
        assert policy.auto_wrap_policy == policy.activation_checkpointing_policy == {QwenImageTransformerBlock}
        assert isinstance(blocks[0], QwenImageTransformerBlock)
        assert model.weights.path is None, "FSDP1 cannot load init_weights into its flat shards"
    else:  # FSDP2: configure_model's parallelize checkpoints and shards every block, as the strategy says
        assert isinstance(strategy, FSDP2Strategy)
        assert strategy.fsdp2.activation_checkpointing and not strategy.fsdp2.hybrid_shard
        assert model.weights.path == str(qwen_root)


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
