"""One whole training step of a configured model, run on fake tensors, measured per rank.

The model comes from the kit's own path: the YAML chain is parsed as `fit` parses it, the module's
`configure_model` builds it on the meta device, `distributed.wrap_model` shards it as the strategy
says (FSDP2 over the fake process group), and `TagMoEModule.loss_terms` computes all three losses.
Then backward and the configured optimizer's step run under torch's memory tracker, its FLOP
counter and a log of FSDP2's collectives. See `fake.py` for what is faked and why.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from tagmoe_lit.backbone.qwen_image import QWEN_IMAGE_IO
from tagmoe_lit.plan.closed_form import Shapes
from tagmoe_lit.plan.encoders import frozen_encoder_bytes
from tagmoe_lit.plan.fake import (CollectiveLog, StubCodec, StubTextEncoder, balanced_expert_splits, cuda_attention, fake_world,
                                  frozen_safe, register_grouped_mm_flops)

# Token shapes of codecs and text encoders whose weights a plan does not load (local folders).
KNOWN_CODECS = {"tagmoe_lit.backbone.QwenVAECodec": {"token_channels": 64, "patch": 2, "channels": 16, "downsample": 16}}
KNOWN_TEXT = {"tagmoe_lit.backbone.QwenVLTextEncoder": QWEN_IMAGE_IO["text_dim"]}


class PlanError(ValueError):
    """A configuration the plan cannot run as asked (one sentence naming the numbers)."""


@dataclass
class Setup:
    """What the plan needs from a parsed config."""

    module: Any  # TagMoEModule, built on meta
    strategy: Any  # the trainer's strategy (None for a plain single-device or DDP config)
    world_size: int
    micro_batch: int
    image_hw: tuple[int, int]
    text_tokens: int
    precision: str
    optimizer: str
    per_node: int = 8  # ranks per node (trainer.devices): NVLink inside, the network between nodes
    frozen: dict[str, int] = field(default_factory=dict)  # bytes of each frozen encoder on every rank

    @property
    def hybrid(self) -> bool:
        """HSDP: shard inside a node, replicate across nodes (`hybrid_shard`)."""
        from tagmoe_lit.distributed.wrap import fsdp2_options

        return self.world_size > 1 and fsdp2_options(self.strategy).hybrid_shard

    @property
    def expert_parallel(self) -> int:
        """Ranks each MoE layer's experts are split over (`expert_parallel_size`; 1: none)."""
        from tagmoe_lit.distributed.wrap import fsdp2_options

        return fsdp2_options(self.strategy).expert_parallel_size if self.world_size > 1 else 1

    @property
    def shards(self) -> int:
        """How many ranks one parameter is split over."""
        return self.per_node if self.hybrid else self.world_size


@dataclass
class Measured:
    """One rank's view of one step."""

    peak: dict[str, int]  # tracker category → bytes at the step's peak ("Total" included)
    after_step: dict[str, int]  # the same right after the optimizer step (parameters, gradients, states)
    flops: int
    expert_flops: int
    all_gather_bytes: list[int] = field(default_factory=list)
    reduce_scatter_bytes: list[int] = field(default_factory=list)
    all_reduce_bytes: list[int] = field(default_factory=list)
    all_gather_ranks: list[int] = field(default_factory=list)  # the group size of each all-gather
    reduce_scatter_ranks: list[int] = field(default_factory=list)
    all_to_all_bytes: list[int] = field(default_factory=list)  # expert parallelism's token exchanges
    moe_dtypes: list[str] = field(default_factory=list)  # dtype of the tokens each MoE layer received
    attention_ops: list[str] = field(default_factory=list)
    forward_end: dict[str, int] = field(default_factory=dict)  # the same when forward ends (saved activations)
    optimizer_stand_in: bool = False  # a state-free SGD ran in place of an optimizer fake tensors cannot run
    tracked: list[nn.Parameter] = field(default_factory=list)  # what the memory tracker covers (shapes only after)
    untracked: list[nn.Parameter] = field(default_factory=list)  # trainable parameters outside it (FSDP2: tag embedder, head)


def setup(config_args: list[str], world_size: int | None, micro_batch: int | None,
          image_hw: tuple[int, int] | None, text_tokens: int) -> Setup:
    """Parse the config chain as `fit` does and build its module on the meta device with stub encoders."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from tagmoe_lit.cli import ParseOnly

    cli = ParseOnly(args=config_args, run=False)
    config = cli.config
    codec, text = config.model.codec, config.model.text_encoder
    config.model.codec = config.model.text_encoder = None  # built below as stubs: no local folders needed
    config.model.meta_init = True
    config.model.init_weights = None  # starting weights do not change the plan; their host RAM is closed form
    init = cli.parser.instantiate_classes(config)
    module, trainer = init.model, init.trainer
    strategy = trainer.strategy if not isinstance(trainer.strategy, str) else None
    if isinstance(strategy, FSDPStrategy):
        raise PlanError("plan follows FSDP2 (experiments/strategy/fsdp2.yaml); FSDP1's flat parameters have no "
                        "per-rank memory tracker in torch, so use the FSDP2 strategy to plan.")
    per_node = int(trainer.devices) if str(trainer.devices).isdigit() else 1  # "auto" or a list: plan one per node
    devices = per_node * (trainer.num_nodes or 1)
    if (world_size or devices) > 1 and not isinstance(strategy, ModelParallelStrategy):
        raise PlanError(f"{world_size or devices} ranks without FSDP2: under DDP every rank holds what one does, so plan "
                        "it with --world_size 1, or add experiments/strategy/fsdp2.yaml to shard.")
    frozen = frozen_encoder_bytes(text, codec, module.codec)
    module.codec = _stub_codec(codec, module.codec)
    limit = int(text.init_args.get("max_length") or 0) if text is not None else module.text_encoder.max_length
    text_tokens = min(text_tokens, limit) if limit else text_tokens  # never more than the encoder keeps
    module.text_encoder = StubTextEncoder(_text_dim(text, module.text_encoder), text_tokens)
    data = config.data.init_args if "init_args" in config.data else config.data
    size = int(data.get("image_size") or 0) or round(float(data.get("max_area") or 0) ** 0.5)
    world = devices if world_size is None else world_size
    return Setup(module, strategy, world, int(data.batch_size) if micro_batch is None else micro_batch,
                 image_hw or (size, size), text_tokens, str(trainer.precision), _class_path(config.model.optimizer),
                 min(per_node, world), frozen)


def _class_path(optimizer: Any) -> str:
    return getattr(optimizer, "class_path", None) or "tagmoe_lit.optim.AdamW"


def _stub_codec(configured: Any, default: nn.Module) -> StubCodec:
    """A stub with the configured codec's shapes (a built-in codec built now, a known one from its sizes)."""
    if configured is None:
        built = default
    elif configured.class_path in KNOWN_CODECS:
        return StubCodec(**KNOWN_CODECS[configured.class_path])
    else:
        from jsonargparse import ArgumentParser

        parser = ArgumentParser()
        parser.add_argument("--codec", type=nn.Module)
        built = parser.instantiate_classes(parser.parse_object({"codec": configured})).codec
    return StubCodec(built.token_channels, built.patch, built.channels, built.downsample)


def _text_dim(configured: Any, default: nn.Module) -> int:
    if configured is not None and configured.class_path in KNOWN_TEXT:
        return KNOWN_TEXT[configured.class_path]
    if configured is not None and configured.class_path != "tagmoe_lit.backbone.FrozenTextEncoder":
        raise PlanError(f"plan knows the width of tagmoe_lit's text encoders only, not {configured.class_path}; "
                        "plan with a kit text encoder of the same width.")
    return default.dim


def shapes(s: Setup) -> Shapes:
    """The closed form's sizes of this setup."""
    m = s.module
    backbone, codec = m.backbone, m.codec
    H, W = s.image_hw
    first = m.moe_layers[0] if m.moe_layers else None
    width = backbone.blocks[0].attn.to_q.in_features
    hidden = first.experts.hidden if first else backbone.blocks[0].img_mlp.net[0].proj.out_features
    return Shapes(
        blocks=len(backbone.blocks), moe_blocks=len(m.moe_layers), width=width, hidden=hidden,
        experts=first.num_experts if first else 0, top_k=first.top_k if first else 1,
        token_channels=codec.token_channels, out_channels=codec.channels * codec.patch**2,
        text_dim=m.text_encoder.dim, image_tokens=2 * (H // codec.downsample) * (W // codec.downsample),
        text_tokens=s.text_tokens, micro_batch=s.micro_batch, checkpointing=checkpointing(s),
        zero_cond_t=backbone.zero_cond_t, tag_macs=_macs(m.tag_embedder), head_macs=_macs(m.head),
    )


def _macs(part: nn.Module | None) -> int:
    """Σ in·out over a component's weight matrices (a linear map or a table used as one)."""
    return sum(p.shape[0] * p.shape[1] for n, p in part.named_parameters() if p.dim() == 2) if part is not None else 0


def checkpointing(s: Setup) -> bool:
    from tagmoe_lit.distributed.wrap import fsdp2_options

    return s.world_size > 1 and fsdp2_options(s.strategy).activation_checkpointing  # applied with the sharding


def _check(s: Setup) -> None:
    problems = []
    if s.world_size < 1 or s.micro_batch < 1:
        problems.append(f"world size {s.world_size} and micro-batch {s.micro_batch} must both be at least 1")
    elif s.hybrid and s.world_size % s.per_node:
        problems.append(f"hybrid_shard needs whole nodes, but {s.world_size} ranks do not divide into nodes of "
                        f"{s.per_node} (trainer.devices)")
    H, W = s.image_hw
    d = s.module.codec.downsample
    if H % d or W % d:
        problems.append(f"image size {H}×{W} is not a multiple of the codec's {d} pixels per token")
    if s.module.moe_layers and not s.precision.startswith(("bf16", "16")):
        problems.append(f"dispatch auto runs the sorted backend for fp32 on CUDA ({s.precision}), whose expert "
                        "counts must reach the host (.tolist()); plan the step in bf16 (--trainer.precision bf16-mixed)")
    for layer in s.module.moe_layers:
        if layer.dispatch not in ("auto", "grouped"):
            problems.append(f"dispatch '{layer.dispatch}' needs data on the host (.tolist()); plan the CUDA dispatch "
                            "'grouped' (or 'auto')")
            break
    if problems:
        raise PlanError("Cannot plan this step: " + "; ".join(problems) + ".")


def _batch(s: Setup) -> dict[str, torch.Tensor | list[str]]:
    B, (H, W) = s.micro_batch, s.image_hw
    tags = torch.zeros(B, s.module.schema.num_tags)
    tags[:, 0] = 1.0
    return {"instruction": ["plan"] * B, "source": torch.zeros(B, 3, H, W), "has_source": torch.ones(B, dtype=torch.bool),
            "target": torch.zeros(B, 3, H, W), "tags": tags, "task": torch.zeros(B, dtype=torch.long),
            "index": torch.arange(B)}


@contextlib.contextmanager
def _autocast(precision: str):
    if precision.startswith("bf16") and precision != "bf16-true":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def _moe_dtypes(module) -> tuple[list[str], list]:
    seen: list[str] = []
    hooks = [layer.register_forward_pre_hook(lambda _, args: seen.append(str(args[0].dtype).replace("torch.", "")))
             for layer in module.moe_layers]
    return seen, hooks


def cuda_step_draws(s: Setup):
    """Set the experts to the dispatch `auto` picks on CUDA (`grouped`) and draw the step's σ, ε and
    dropouts as real CPU tensors (fake draws would fail `conditioning`): what the planned step and the
    real CPU step it is checked against (`real.py`) share."""
    m = s.module
    for layer in m.moe_layers:
        layer.dispatch = "grouped"
    x = torch.zeros(s.micro_batch, 3, *s.image_hw)
    h, w = m.grid(x)
    return m.objective.training_draws(s.micro_batch, (h * w, m.codec.token_channels), x, 0, 0)


class _Step(nn.Module):
    """`loss_terms` as one module call: torch's memory tracker refuses a top-level module called twice in
    a step, which the alignment baselines do with the head; under a parent it tracks repeated calls."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, batch: dict, draws) -> dict[str, torch.Tensor]:
        return self.module.loss_terms(batch, draws.sigma_B, draws.noise_BTP, draws.drop_text_B, draws.drop_ref_B)


def _shard(s: Setup, parts: list[nn.Module]) -> None:
    """FSDP2 as the kit applies it, over Lightning's mesh (nodes × ranks per node) of the fake world."""
    from torch.distributed.device_mesh import init_device_mesh

    from tagmoe_lit.distributed.wrap import wrap_model

    nodes = s.world_size // s.per_node if s.world_size % s.per_node == 0 else 1
    mesh = init_device_mesh("cpu", (nodes, s.world_size // nodes), mesh_dim_names=("data_parallel", "tensor_parallel"))
    wrap_model(parts[0], parts[1:], mesh, s.strategy, meta=False)


def _tracker(sharded: bool, m: nn.Module, parts: list[nn.Module], optimizer: torch.optim.Optimizer):
    """torch's memory tracker for rank 0: FSDP2's with the backbone as its root (the tag embedder and
    head are small roots of their own, tracked as external), or the plain one over the whole module."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    if sharded:
        tracker = frozen_safe(FSDPMemTracker)(parts[0], optimizer)
        tracker.track_external(*parts[1:])
    else:
        tracker = frozen_safe(MemTracker)()
        tracker.track_external(m, optimizer)
    return tracker


def _bytes_by_kind(snapshot: dict) -> dict[str, int]:
    """A tracker snapshot of the (one) device as {category name: bytes}, empty categories dropped."""
    return {getattr(k, "value", k): v for k, v in next(iter(snapshot.values())).items() if v}


def run_step(s: Setup) -> Measured:
    """Shard (W > 1), allocate as fake tensors, run loss + backward + optimizer step; measure rank 0."""
    m = s.module
    m.configure_model()  # on meta, no trainer: nothing is wrapped or allocated yet
    _check(s)
    register_grouped_mm_flops()
    sharded = s.world_size > 1
    with fake_world(s.world_size) if sharded else contextlib.nullcontext():
        parts = [p for p in (m.backbone, m.tag_embedder, m.head) if p is not None]
        if sharded:
            _shard(s, parts)
        draws = cuda_step_draws(s)
        log = CollectiveLog()
        with FakeTensorMode(allow_non_fake_inputs=True):
            for part in parts:
                part.to_empty(device="cpu")
            m.backbone.rebuild_rope()
            batch = _batch(s)
            trainable = [p for p in m.parameters() if p.requires_grad]
            stand_in = s.optimizer.startswith("bitsandbytes.")  # its kernels read data: states in closed form
            optimizer = torch.optim.SGD(trainable, lr=0.0) if stand_in else m.optimizer_factory(trainable)
            tracker = _tracker(sharded, m, parts, optimizer)
            seen, hooks = _moe_dtypes(m)
            flops = FlopCounterMode(display=False)
            with tracker, flops, log.recording(), cuda_attention(), balanced_expert_splits():
                with _autocast(s.precision):
                    terms = _Step(m)(batch, draws)
                forward_end = tracker.get_tracker_snapshot()  # what forward leaves for backward
                terms["loss"].backward()
                optimizer.step()
                after = tracker.get_tracker_snapshot()  # parameters, gradients and optimizer state as they stay
                optimizer.zero_grad()
            for hook in hooks:
                hook.remove()
            peak = tracker.get_tracker_snapshot("peak")
    counts = flops.get_flop_counts().get("Global", {})
    return Measured(
        peak=_bytes_by_kind(peak), after_step=_bytes_by_kind(after), forward_end=_bytes_by_kind(forward_end),
        flops=flops.get_total_flops(), expert_flops=int(counts.get(torch.ops.aten._grouped_mm, 0)),
        all_gather_bytes=log.all_gather, reduce_scatter_bytes=log.reduce_scatter, all_reduce_bytes=log.all_reduce,
        all_gather_ranks=log.all_gather_ranks, reduce_scatter_ranks=log.reduce_scatter_ranks, all_to_all_bytes=log.all_to_all,
        moe_dtypes=seen,
        attention_ops=sorted(str(op).replace("aten.", "") for op in counts if "attention" in str(op)),
        optimizer_stand_in=stand_in,
        tracked=list((m.backbone if sharded else m).parameters()),
        untracked=[p for part in parts[1:] for p in part.parameters() if p.requires_grad] if sharded else [],
    )
