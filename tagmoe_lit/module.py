"""`TagMoEModule`: composes backbone, MoE, alignment and flow matching into one training step.

The module holds no component math. It builds the components in `configure_model` (from factories,
so a large backbone is never built at parse time), and its step reads like DiT's loop:

    σ, ε ~ sampler(seed, step, sample)        # explicit generator per sample: bit-exact resume, any world size
    x_σ = (1 − σ)·x0 + σ·ε                    # flow.interpolate
    v̂, routing = backbone(x_σ, reference, text, σ)
    L = L_flow + λ_lb·L_lb + λ_align·(1 − cos(H(g), s))

With `meta_init` the components are built on the meta device and materialized with their
declared init once the strategy has placed (and, FSDP2, sharded) them; `init_weights` then fills
them from a Qwen-Image release or a `convert` directory at the first loop start, unless
`--ckpt_path` restores a checkpoint (docs/distributed.md).

After every training and evaluation forward the module publishes `routing`, a `RoutingRecord`
(detached routing stats, the batch's task ids and tags, s and the head's cosine to it); callbacks
read that attribute and nothing else. `generate` is the one sampling path: `predict`, `test` and
the sample-grid callback all call it.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from tagmoe_lit.align import MLPHead, SumTagEmbedder, alignment_baselines, alignment_loss, routing_signature
from tagmoe_lit.backbone import FrozenTextEncoder, PixelCodec, QwenImageBackbone
from tagmoe_lit.convert.files import COMPONENTS, pretrained_tensors
from tagmoe_lit.flow import LogitNormalSampler, TimestepSampler, flow_loss, interpolate
from tagmoe_lit.metrics.editing import confusion, edit_metrics, source_alternatives
from tagmoe_lit.metrics.report import TaskReport
from tagmoe_lit.moe import RoutingRecord, RoutingStats, load_balancing_loss, router_z_loss
from tagmoe_lit.moe.losses import global_counts
from tagmoe_lit.parallel import materialize_, parallelize, uninitializable
from tagmoe_lit.quantize import QuantMode, quantize_linears
from tagmoe_lit.sampling import EulerSampler
from tagmoe_lit.tags import TagSchema

BackboneFactory = Callable[[int, int, int, int], nn.Module]  # (token_channels, patch, out_channels, text_dim)
TagEmbedderFactory = Callable[[int], nn.Module]  # (num_tags) → module with `.dim`
HeadFactory = Callable[[int, int], nn.Module]  # (num_experts, tag_dim)
EVAL_SIGMAS = (0.25, 0.5, 0.75)


def resolve_optimizer(path: str) -> type[torch.optim.Optimizer]:
    """The optimizer class named by an import path such as `bitsandbytes.optim.AdamW8bit`."""
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"model.optimizer '{path}' is not an importable optimizer class; use e.g. torch.optim.AdamW, "
                         "bitsandbytes.optim.AdamW8bit or bitsandbytes.optim.PagedAdamW8bit.")
    return cls


def step_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and names, stable across machines and Python runs."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for another tag schema or MoE shape."""


class TagMoEModule(L.LightningModule):
    """TAG-MoE on a Qwen-Image MM-DiT, trained by rectified flow on editing + generation data."""

    def __init__(
        self,
        schema: str = "synthtag",
        backbone: BackboneFactory = QwenImageBackbone,
        text_encoder: nn.Module | None = None,
        codec: nn.Module | None = None,
        tag_embedder: TagEmbedderFactory | None = SumTagEmbedder,
        head: HeadFactory = MLPHead,
        timesteps: TimestepSampler | None = None,
        sampler: EulerSampler | None = None,
        lambda_lb: float = 0.01,
        lambda_align: float = 1.0,
        lambda_z: float = 0.0,
        text_dropout: float = 0.1,
        reference_dropout: float = 0.05,
        optimizer: str = "torch.optim.AdamW",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 50,
        cosine_decay: bool = True,
        min_lr_ratio: float = 0.1,
        seed: int = 0,
        sample_in_test: bool = True,
        trainable: Literal["all", "moe_tail"] = "all",
        quantize_frozen: QuantMode | None = None,
        meta_init: bool = False,
        init_weights: str | None = None,
        activation_checkpointing: bool = False,
        hybrid_shard: bool = False,
    ):
        """
        Args:
            schema: tag schema name or YAML path (linked from `data.schema` by the CLI).
            backbone: factory of the MM-DiT; called with (token_channels, patch, out_channels, text_dim).
            text_encoder: instructions → text tokens (default: frozen bundled MiniLM).
            codec: images ↔ image tokens (default: `PixelCodec(patch=2)`).
            tag_embedder: factory (num_tags) → s-embedder; null disables the alignment branch.
            head: factory (num_experts, tag_dim) → prediction head H.
            timesteps: σ sampler called as (n, generator) (default: logit-normal(0, 1)).
            sampler: image sampler used by `predict` (default: 30 Euler steps, CFG 4).
            lambda_lb: weight of the load-balancing loss (official: 0.01).
            lambda_align: weight of the alignment loss (paper: unpublished; default 1.0).
            lambda_z: weight of the router z-loss (ST-MoE uses 1e-3; logged even at 0).
            text_dropout: probability of training a sample with the empty instruction (for CFG).
            reference_dropout: probability of training an edit with a blank reference frame.
            optimizer: import path of the optimizer class, called as (params, lr, betas, weight_decay):
                torch.optim.AdamW, or bitsandbytes' 8-bit-state bitsandbytes.optim.AdamW8bit /
                bitsandbytes.optim.PagedAdamW8bit (paging needs CUDA; on CPU it runs unpaged).
            lr: peak learning rate.
            weight_decay: weight decay.
            betas: Adam betas.
            warmup_steps: linear warmup steps.
            cosine_decay: decay to `min_lr_ratio`·lr over `trainer.max_steps` after warmup.
            min_lr_ratio: final learning rate as a fraction of `lr`.
            seed: seeds the per-step noise / σ / dropout generator (with step and rank).
            sample_in_test: `test` also samples every test image and scores the edits against the
                data's exact targets (data modules with `exact_targets`, i.e. SynthTAG; slow:
                `sampler.steps` forwards per batch, twice with guidance); off: flow losses only.
            trainable: all (every parameter) or moe_tail (only the MoE layers — experts and routers —,
                the tag embedder and the head; the rest of the backbone is frozen).
            quantize_frozen: store frozen linear layers in int8 (LLM.int8) or nf4 with bitsandbytes:
                the text encoder's model and, with trainable: moe_tail, the blocks without MoE
                (single-process / DDP only; null: full precision).
            meta_init: build backbone, tag embedder and head on the meta device (no rank holds the
                whole model), then allocate them where the strategy places them (sharded under
                FSDP/FSDP2) with every module's declared init, as an eager build would start;
                weights come from `init_weights` or `--ckpt_path`, else training starts from scratch.
            init_weights: full weights to start from: a diffusers Qwen-Image folder (root or
                `transformer/`; dense, so the MoE experts are upcycled from its FFNs and the routers,
                tag embedder and head keep their init) or a `convert official` / `convert export`
                directory. Loaded once the model is materialized and sharded, before the first step;
                `--ckpt_path` wins (null: no weights loaded).
            activation_checkpointing: under ModelParallelStrategy (FSDP2), recompute each block in
                backward (elsewhere: backbone.gradient_checkpointing, or FSDPStrategy's
                activation_checkpointing_policy).
            hybrid_shard: under ModelParallelStrategy, shard within a node and replicate across
                nodes (HSDP) instead of sharding over all ranks.
        """
        super().__init__()
        self.schema = TagSchema.load(schema)
        self.backbone_factory, self.tag_embedder_factory, self.head_factory = backbone, tag_embedder, head
        self.text_encoder = text_encoder if text_encoder is not None else FrozenTextEncoder()
        self.codec = codec if codec is not None else PixelCodec()
        self.timesteps = timesteps if timesteps is not None else LogitNormalSampler()
        self.sampler = sampler if sampler is not None else EulerSampler()
        self.lambda_lb, self.lambda_align, self.lambda_z = lambda_lb, lambda_align, lambda_z
        self.text_dropout, self.reference_dropout = text_dropout, reference_dropout
        self.optimizer_class = resolve_optimizer(optimizer)
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.cosine_decay, self.min_lr_ratio = warmup_steps, cosine_decay, min_lr_ratio
        self.seed, self.sample_in_test = seed, sample_in_test
        problems = []
        if trainable not in ("all", "moe_tail"):
            problems.append(f"trainable='{trainable}' is unknown; choose 'all' or 'moe_tail'")
        if quantize_frozen not in (None, "int8", "nf4"):
            problems.append(f"quantize_frozen='{quantize_frozen}' is unknown; choose null, 'int8' or 'nf4'")
        if meta_init and quantize_frozen and trainable == "moe_tail":
            problems.append("meta_init cannot quantize frozen backbone blocks that do not exist yet (quantize_frozen with "
                            "trainable: moe_tail); set meta_init: false or quantize_frozen: null")
        if init_weights is not None and quantize_frozen and trainable == "moe_tail":
            problems.append("init_weights cannot fill backbone blocks that quantize_frozen has already quantized; "
                            "start from backbone.init_args.pretrained_path instead, or set quantize_frozen: null")
        if problems:
            raise ValueError("TagMoEModule: " + "; ".join(problems) + ".")
        self.trainable, self.quantize_frozen, self.meta_init = trainable, quantize_frozen, meta_init
        self.init_weights = init_weights
        self._weights_settled = False  # init_weights considered (loaded, or skipped for a checkpoint)
        self._full_shapes: dict[str, torch.Tensor] = {}  # component keys → meta tensors of the unsharded shapes
        self.activation_checkpointing, self.hybrid_shard = activation_checkpointing, hybrid_shard
        self._counts_after_forward: list[torch.Tensor] = []
        self.backbone: nn.Module | None = None
        self.tag_embedder: nn.Module | None = None
        self.head: nn.Module | None = None
        self.routing: RoutingRecord | None = None
        self._eval_sums: dict[str, list[float]] = {}
        self._report: TaskReport | None = None
        self.test_summary: dict | None = None  # the last `test`'s per-task tables (TaskReport.summary)
        self.test_report_name: str | None = "test_report"  # files `test` writes; None: keep it in memory

    # -- building ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Refuse a missing `init_weights` before the (possibly sharded, full-size) model is built."""
        pretrained = self._backbone_options().get("pretrained_path")
        if self.meta_init and pretrained is not None and self.init_weights is None:
            raise ValueError(f"model.meta_init builds the backbone without weights, so backbone pretrained_path {pretrained} "
                             "would be ignored; set model.init_weights to the same folder to load it after materializing.")
        if self.init_weights is not None and not Path(self.init_weights).exists():
            raise FileNotFoundError(f"model.init_weights {self.init_weights} does not exist; point it at a local Qwen-Image "
                                    "folder or a `convert` directory, or set it to null.")

    def configure_model(self) -> None:
        """Build the components once (idempotent: Lightning may call it again), then freeze,
        quantize and shard them as configured. Under ModelParallelStrategy (`device_mesh` set)
        each component is sharded with FSDP2 (`tagmoe_lit.parallel`); the model holds no
        parallelism of its own. A meta build is materialized here under a trainer (`_materialize`)
        and stays on meta without one (inspection, parameter counts)."""
        if self.backbone is not None:
            return
        mesh = self.device_mesh
        if self.activation_checkpointing and mesh is None and self._trainer is not None:  # no trainer: inspection, export
            raise ValueError("model.activation_checkpointing applies under ModelParallelStrategy (FSDP2); elsewhere set "
                             "model.backbone.init_args.gradient_checkpointing: true or FSDPStrategy's activation_checkpointing_policy.")
        with torch.device("meta") if self.meta_init else nullcontext():
            self.backbone = self.backbone_factory(
                self.codec.token_channels, self.codec.patch, self.codec.channels, self.text_encoder.dim
            )
            if self.has_moe and self.tag_embedder_factory is not None:
                self.tag_embedder = self.tag_embedder_factory(self.schema.num_tags)
                self.head = self.head_factory(self.num_experts, self.tag_embedder.dim)
        # the unsharded keys and shapes, for checking init_weights once the parameters are sharded
        self._full_shapes = {k: torch.empty_like(t, device="meta") for k, t in self.state_dict().items()
                             if k.split(".", 1)[0] in COMPONENTS}
        self._freeze_unreachable()
        if self.trainable == "moe_tail":
            self._freeze_all_but_moe_tail()
        if self.quantize_frozen:
            self._quantize_frozen(sharded=mesh is not None)
        if mesh is not None:
            blocks = getattr(self.backbone, "blocks", None)
            options = {"activation_checkpointing": self.activation_checkpointing, "hybrid_shard": self.hybrid_shard}
            parallelize(self.backbone, mesh, blocks, **options)
            for part in (self.tag_embedder, self.head):
                if part is not None:
                    parallelize(part, mesh, hybrid_shard=self.hybrid_shard)
        if self.meta_init and self._trainer is not None:
            self._materialize()

    def _materialize(self) -> None:
        """Allocate the meta-built components on the strategy's device with their declared init
        (`parallel.materialize_`): here for one device, DDP and FSDP2 (sharded above: each rank
        allocates its shards). FSDP1 wraps and materializes unit by unit in its own setup, so it gets
        `materialize_` as its `param_init_fn` (its default calls `reset_parameters` on every module
        and fails on diffusers' RMSNorm, which has none)."""
        parts = [p for p in (self.backbone, self.tag_embedder, self.head) if p is not None]
        unknown = sorted({name for part in parts for name in uninitializable(part)})
        if unknown:
            raise TypeError(f"model.meta_init cannot initialize {', '.join(unknown)} (no reset_parameters and no entry in "
                            "tagmoe_lit.parallel.INITS); add one there, or set meta_init: false.")
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            strategy.kwargs["param_init_fn"] = partial(materialize_, device=strategy.root_device)
            return
        for part in parts:
            materialize_(part, strategy.root_device)

    def _freeze_unreachable(self) -> None:
        """Freeze what can never reach the loss: the MM-DiT's last block still computes a text-stream
        output (`attn.to_add_out`, then `txt_mlp`) that nothing reads. Left trainable, these never get a
        gradient and DDP stops with "parameters that were not used in producing the loss" (DESIGN.md
        pitfall 2); frozen, training is unchanged (they never moved) and DDP needs no unused-parameter search."""
        blocks = getattr(self.backbone, "blocks", None)
        if not blocks:
            return
        last = blocks[-1]
        for dead in (getattr(getattr(last, "attn", None), "to_add_out", None), getattr(last, "txt_mlp", None)):
            if dead is not None:
                dead.requires_grad_(False)

    def _freeze_all_but_moe_tail(self) -> None:
        """trainable: moe_tail — only the MoE layers (experts, routers), tag embedder and head learn."""
        if not self.has_moe:
            raise ValueError("trainable: moe_tail needs MoE layers, but the backbone has none; set model.backbone.init_args.moe "
                             "or use trainable: all.")
        self.requires_grad_(False)
        for part in (*self.moe_layers, self.tag_embedder, self.head):
            if part is not None:
                part.requires_grad_(True)

    def _quantize_frozen(self, sharded: bool) -> None:
        """Store the frozen text encoder and (moe_tail) the blocks without MoE in `quantize_frozen` bits."""
        frozen_model = getattr(self.text_encoder, "frozen_model", None)  # the encoder's model is outside the module tree
        swapped = quantize_linears(frozen_model(), self.quantize_frozen) if frozen_model is not None else 0
        if self.trainable == "moe_tail":
            if sharded:
                raise ValueError("quantize_frozen with trainable: moe_tail quantizes backbone blocks, which FSDP cannot shard; "
                                 "use DDP or a single device, or set quantize_frozen: null.")
            moe_layers = set(map(id, self.moe_layers))
            for block in getattr(self.backbone, "blocks", []):
                if not any(id(m) in moe_layers for m in block.modules()):
                    swapped += quantize_linears(block, self.quantize_frozen)
        if not swapped:
            raise ValueError(f"quantize_frozen: {self.quantize_frozen} found no frozen linear layer (the text encoder "
                             f"{type(self.text_encoder).__name__} exposes no frozen_model and trainable is {self.trainable}); "
                             "set quantize_frozen: null.")

    @property
    def moe_layers(self) -> list[nn.Module]:
        """The backbone's MoE layers in block order (empty for a dense backbone)."""
        return list(getattr(self.backbone, "moe_layers", []))

    @property
    def has_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def num_experts(self) -> int:
        return self.moe_layers[0].num_experts if self.has_moe else 0

    # -- forward -------------------------------------------------------------------------------
    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        H, W = images.shape[-2:]
        d = self.codec.downsample
        if H % d or W % d:
            raise ValueError(f"Image size {H}×{W} is not a multiple of the codec's {d} pixels per token.")
        return H // d, W // d

    def velocity(
        self,
        noisy: torch.Tensor,
        reference: torch.Tensor,
        grid: tuple[int, int],
        instructions: list[str],
        sigma: torch.Tensor,
        tag_embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RoutingStats | None]:
        """Backbone call with text encoding: the one forward training and sampling share.

        `tag_embedding` (s, [B, D]) reaches only routers that declare `needs_context` (the
        tag-conditioned oracle); TAG-MoE's own routers never see tags.
        """
        rebuild_rope = getattr(self.backbone, "rebuild_rope", None)
        if rebuild_rope is not None:  # a strategy that materializes module by module (FSDP1) never calls the backbone's _apply
            rebuild_rope()
        for layer in self.moe_layers:
            layer.context = tag_embedding
        text, text_mask = self.text_encoder(instructions, device=noisy.device)
        return self.backbone(noisy, reference, grid, text.to(noisy.dtype), text_mask, sigma.to(noisy.device))

    def tag_embedding(self, batch: dict) -> torch.Tensor | None:
        """s = Σ tag embeddings of each sample, or None without a tag embedder."""
        return self.tag_embedder(batch["tags"]) if self.tag_embedder is not None else None

    def encode_images(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Target and source image tokens (x0, source); encode once when several forwards share a batch."""
        return self.codec.encode(batch["target"]), self.codec.encode(batch["source"])

    def _conditioning(
        self, batch: dict, source_tokens: torch.Tensor, drop_text: torch.Tensor, drop_ref: torch.Tensor
    ) -> tuple[list[str], torch.Tensor]:
        """Instructions and reference tokens, blanked where dropped (blank frame = zero tokens)."""
        instructions = ["" if d else t for t, d in zip(batch["instruction"], drop_text.tolist())]
        keep = (batch["has_source"] & ~drop_ref.to(batch["has_source"].device)).to(source_tokens.dtype)
        return instructions, source_tokens * keep[:, None, None]

    def _draw_noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """ε in token space for images x, drawn on CPU from `generator` (the same on any device)."""
        h, w = self.grid(x)
        return torch.randn(x.shape[0], h * w, self.codec.token_channels, generator=generator).to(x)

    def _sample_noise(self, batch: dict, purpose: str) -> torch.Tensor:
        """ε per sample, seeded by (seed, purpose, sample index): independent of batch-mates and ranks."""
        x = batch["target"]
        return torch.cat([
            self._draw_noise(x[i : i + 1], torch.Generator().manual_seed(step_seed(self.seed, purpose, i_global)))
            for i, i_global in enumerate(batch["index"].tolist())
        ])

    def _training_draws(self, x: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, ...]:
        """σ [B], ε, drop_text [B], drop_ref [B] of a training batch, each sample from its own generator.

        The generator is seeded by (seed, global step, the sample's position in the step's global
        batch): micro-batch m of A on rank r of W holds positions (m·W + r)·B … + B − 1, which is the
        data modules' layout (`data/datamodule.py`). So the draws depend neither on how the global
        batch is split into ranks and micro-batches nor on batch-mates: 2 ranks × B see exactly the
        noise of 1 rank × 2B, and a resumed run the noise of a straight one.
        """
        B = x.shape[0]
        micro, world = (batch_idx % self.trainer.accumulate_grad_batches, self.trainer.world_size) if self._trainer else (0, 1)
        first = (micro * world + self.global_rank) * B
        sigma, noise, drop_text, drop_ref = [], [], [], []
        for i in range(B):
            gen = torch.Generator().manual_seed(step_seed(self.seed, "train", self.global_step, first + i))
            sigma.append(self.timesteps(1, gen))
            noise.append(self._draw_noise(x[i : i + 1], gen))
            drop_text.append(torch.rand(1, generator=gen) < self.text_dropout)
            drop_ref.append(torch.rand(1, generator=gen) < self.reference_dropout)
        return torch.cat(sigma), torch.cat(noise), torch.cat(drop_text), torch.cat(drop_ref)

    def loss_terms(
        self,
        batch: dict,
        sigma: torch.Tensor,
        noise: torch.Tensor,
        drop_text: torch.Tensor,
        drop_ref: torch.Tensor,
        images: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """All loss terms of one batch; `loss` is the weighted total. Publishes routing stats.

        `images` takes `encode_images(batch)` when the caller already has it.
        """
        if batch["tags"].shape[1] != self.schema.num_tags:
            raise ValueError(
                f"Batch tags have {batch['tags'].shape[1]} ids but the model's schema {self.schema.name} has "
                f"{self.schema.num_tags}; use the same `schema` for data and model."
            )
        x0, source_tokens = images if images is not None else self.encode_images(batch)
        instructions, reference = self._conditioning(batch, source_tokens, drop_text, drop_ref)
        s = self.tag_embedding(batch)
        pred, stats = self.velocity(interpolate(x0, noise, sigma), reference, self.grid(batch["target"]), instructions, sigma, s)
        per_sample = flow_loss(pred, x0, noise)
        terms = {"flow": per_sample.mean(), "flow_per_sample": per_sample.detach()}
        loss = terms["flow"]
        if stats is not None:
            terms["lb"] = load_balancing_loss(stats)
            terms["z"] = router_z_loss(stats)
            loss = loss + self.lambda_lb * terms["lb"] + self.lambda_z * terms["z"]
            align_B = None
            if s is not None:
                g = routing_signature(stats)
                align_B = alignment_loss(self.head(g), s)
                terms["align"] = align_B.mean()
                terms.update(alignment_baselines(self.head, g.detach(), s.detach()))
                loss = loss + self.lambda_align * terms["align"]
            terms["router_entropy"] = torch.stack([layer.entropy for layer in stats.layers]).mean()
            self.routing = RoutingRecord(
                stats.detached(),
                batch["task"].detach(),
                batch["tags"].detach(),
                None if s is None else s.detach(),
                None if align_B is None else 1.0 - align_B.detach(),
            )
        terms["loss"] = loss
        return terms

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["target"]
        B = x.shape[0]
        sigma, noise, drop_text, drop_ref = self._training_draws(x, batch_idx)
        terms = self.loss_terms(batch, sigma.to(x.device), noise, drop_text, drop_ref)
        self._counts_after_forward = [layer.pending_counts_E.clone() for layer in self.moe_layers]
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(
                f"Training loss is {terms['loss'].item()} at step {self.global_step} (terms: "
                f"{ {k: round(v.item(), 4) for k, v in terms.items() if v.dim() == 0} }); lower `model.lr` or check the data."
            )
        per_sample = terms.pop("flow_per_sample")
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=B)
        bins = (sigma * 4).long().clamp(max=3)  # flow loss binned by σ quartile (minRF's lossbin view)
        for b in bins.unique().tolist():
            self.log(f"train/flow_sigma_q{b}", per_sample[bins.to(per_sample.device) == b].mean(), batch_size=B)
        return terms["loss"]

    # -- evaluation ----------------------------------------------------------------------------
    def _fixed_noise_terms(self, batch: dict) -> tuple[dict[str, float], torch.Tensor]:
        """Flow loss at fixed σ ∈ {0.25, 0.5, 0.75} and fixed noise, with and without conditioning.

        Returns batch means of every term (alignment etc. at σ = 0.5) and the conditional flow
        loss per sample [B] (mean over σ); the published routing is the σ = 0.5 conditional forward's.
        """
        x = batch["target"]
        B = x.shape[0]
        noise = self._sample_noise(batch, "eval")
        images = self.encode_images(batch)  # shared by the 6 forwards below
        keep, drop = torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)
        out = {"flow_fixed": 0.0, "flow_fixed_uncond": 0.0}
        flow_B, routing = torch.zeros(B, device=x.device), None
        for s in EVAL_SIGMAS:
            sigma = torch.full((B,), s, device=x.device)
            out["flow_fixed_uncond"] += self.loss_terms(batch, sigma, noise, drop, drop, images)["flow"].item() / len(EVAL_SIGMAS)
            terms = self.loss_terms(batch, sigma, noise, keep, keep, images)
            out["flow_fixed"] += terms["flow"].item() / len(EVAL_SIGMAS)
            flow_B += terms["flow_per_sample"] / len(EVAL_SIGMAS)
            if s == 0.5:
                out.update({k: v.item() for k, v in terms.items() if k not in ("flow", "loss", "flow_per_sample")})
                routing = self.routing
        self.routing = routing
        return out, flow_B

    def _eval_step(self, batch: dict) -> torch.Tensor:
        means, flow_B = self._fixed_noise_terms(batch)
        for k, v in means.items():
            self._eval_sums.setdefault(k, []).append(v)
        return flow_B

    def _eval_epoch_end(self, prefix: str) -> dict[str, float]:
        metrics = {f"{prefix}/{k}": sum(v) / len(v) for k, v in self._eval_sums.items()}
        self._eval_sums = {}
        if f"{prefix}/flow_fixed" in metrics:
            metrics[f"{prefix}/cond_gain"] = metrics[f"{prefix}/flow_fixed_uncond"] / metrics[f"{prefix}/flow_fixed"] - 1
        if self.trainer.sanity_checking:  # Lightning drops self.log here; keep the step-0 reference
            for logger in self.loggers:
                logger.log_metrics(metrics, step=0)
        else:
            self.log_dict(metrics, sync_dist=True)
        return metrics

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self._report = TaskReport(getattr(self.trainer.datamodule, "task_names", None))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Per-sample flow loss at fixed noise and, with `sample_in_test`, sampled-edit metrics."""
        metrics = {"flow_fixed": self._eval_step(batch)}
        top1 = [layer.top1_counts_BE for layer in self.routing.stats.layers] if self.routing else []
        if self.sample_in_test and getattr(self.trainer.datamodule, "exact_targets", False):
            images, _ = self.generate(batch)
            metrics.update(edit_metrics(images, batch["target"], batch["source"], batch["mask"], batch["has_source"]))
            # did it do another (source-determined) edit instead? undefined without a source
            alternatives_KB3HW = torch.stack(list(source_alternatives(batch["source"]).values()))
            confused_B = (confusion(images, batch["target"], alternatives_KB3HW) >= 0).float()
            metrics["confusion"] = confused_B.masked_fill(~batch["has_source"].to(confused_B.device), math.nan)
        self._report.add(batch["task"], metrics, top1, batch["index"])

    def on_test_epoch_end(self) -> None:
        """Log per-task test metrics and write `test_report.{json,md}` into the run's log directory."""
        self._eval_epoch_end("test")
        report, self._report = self._report, None
        if self.trainer.world_size > 1:
            parts = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, report)
            report = TaskReport.merge(parts)
        summary = self.test_summary = report.summary()
        per_task = {f"test/{task}/{k}": v for task, row in summary["tasks"].items() for k, v in row.items()}
        per_task.update({f"test_routing/{layer}/{k}": v[k] for layer, v in summary["routing"].items() for k in ("nmi", "nmi_shuffled")})
        for logger in self.loggers:
            logger.log_metrics({k: v for k, v in per_task.items() if not math.isnan(v)}, step=self.global_step)
        directory = self.trainer.log_dir or self.trainer.default_root_dir  # collective: every rank asks
        if self.trainer.is_global_zero and self.test_report_name:
            json_path, md_path = report.write(directory, self.test_report_name, summary)
            print(f"\nPer-task test metrics ({json_path}):\n\n{md_path.read_text()}")

    @torch.no_grad()
    def generate(self, batch: dict, sampler: EulerSampler | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sample each batch image from its instruction and reference (tags only reach oracle routers).

        Each sample's starting noise is seeded by its own `index`, so an image does not depend on
        its batch-mates. Returns images [B, 3, H, W] in [0, 1] and the routing signature per MoE
        layer [L, B, E] averaged over the sampler's conditional forwards (None for a dense model).
        """
        no_drop = torch.zeros(len(batch["instruction"]), dtype=torch.bool)
        instructions, reference = self._conditioning(batch, self.codec.encode(batch["source"]), no_drop, no_drop)
        grid = self.grid(batch["target"])
        noise = self._sample_noise(batch, "sample")
        s = self.tag_embedding(batch)
        signatures: list[torch.Tensor] = []

        def velocity(x, ref, grid_hw, instr, sigma):
            pred, stats = self.velocity(x, ref, grid_hw, instr, sigma, s)
            if stats is not None and instr is instructions:  # the conditional branch
                signatures.append(torch.stack([layer.signature_BE for layer in stats.layers]))
            return pred, stats

        tokens = (sampler or self.sampler)(velocity, instructions, reference, grid, self.codec.token_channels, noise=noise)
        images = self.codec.decode(tokens, *grid).clamp(0, 1)
        return images, torch.stack(signatures).mean(0) if signatures else None

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        """Generated images with their routing signatures, for `callbacks.PredictionWriter`."""
        images, signature_LBE = self.generate(batch)
        return {"images": images, "signature_LBE": signature_LBE}

    # -- starting weights ------------------------------------------------------------------------
    def on_validation_start(self) -> None:
        self._settle_weights()  # fit's sanity check comes before on_train_start

    def on_test_start(self) -> None:
        self._settle_weights()

    def on_predict_start(self) -> None:
        self._settle_weights()

    def on_train_start(self) -> None:
        """Start from `init_weights` (if not done by a sanity check) with no pending expert counts
        (the buffer is not saved: a fit interrupted mid-step would leave its counts behind)."""
        self._settle_weights()
        for layer in self.moe_layers:
            layer.pending_counts_E.zero_()

    def _settle_weights(self) -> None:
        """Load `init_weights` once, at the first loop start: Lightning has materialized, sharded and
        (with --ckpt_path) restored the module by then under every strategy (FSDP ones restore after
        `on_fit_start`), so a checkpoint wins and no step or validation sees other weights."""
        if self.init_weights is None or self._weights_settled:
            return
        self._weights_settled = True
        if self.trainer.ckpt_path is not None:
            rank_zero_info(f"model.init_weights {self.init_weights} is not loaded: the run restores {self.trainer.ckpt_path}.")
            return
        left = self.load_init_weights()
        rank_zero_info(f"Loaded model.init_weights {self.init_weights}" + (f"; kept as initialized: {', '.join(left)}." if left else "."))

    def load_init_weights(self) -> list[str]:
        """Load `init_weights` into the built (materialized) module, every key checked; return the parts left as built.

        Unsharded (one device, DDP) every rank reads the files and loads them with `load_state_dict`.
        Under FSDP2 `set_model_state_dict` writes the full tensors into the shards: only rank 0 reads
        and checks (its verdict is shared, so every rank raises the same error) and each tensor is
        broadcast in turn. FSDP1 is refused (see below).
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.tensor import DTensor

        if self.init_weights is None:
            raise ValueError("load_init_weights needs model.init_weights; set it to a Qwen-Image folder or a `convert` directory.")
        self.configure_model()
        if any(t.is_meta for t in (*self.parameters(), *self.buffers())):
            raise ValueError("load_init_weights needs materialized weights but the model is on the meta device; run it under "
                             "a Trainer, or call tagmoe_lit.parallel.materialize_ on each component first.")
        root = self.trainer.model if self._trainer is not None else self
        if isinstance(root, FullyShardedDataParallel):
            # set_model_state_dict fills keys the source lacks (VAE, routers, head) with FSDP1's flat local
            # shards, which its full-state-dict load then rejects; FSDP2 and unsharded loads are tested
            raise ValueError("model.init_weights is not supported under FSDPStrategy (FSDP1); start from released weights "
                             "with ModelParallelStrategy (experiments/qwen_image_fsdp2.yaml), then resume FSDP1 from its checkpoint.")
        fsdp2 = any(isinstance(p, DTensor) for p in self.parameters())
        broadcast = fsdp2 and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        tensors, left, error = {}, [], None
        if not broadcast or torch.distributed.get_rank() == 0:
            try:
                tensors, left = pretrained_tensors(self, self.init_weights, self._full_shapes, **self._upcycling())
            except Exception as e:  # any failure (corrupt safetensors, OOM, …) is raised on every rank below:
                error = e           # a rank that raised alone would leave the others waiting in the broadcast
        if broadcast:
            verdict = [left, error]
            torch.distributed.broadcast_object_list(verdict, src=0)
            left, error = verdict
        if error is not None:
            raise error
        if fsdp2:
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast, strict=False)  # keys checked above
            set_model_state_dict(root, tensors, options=options)
        else:
            self.load_state_dict(tensors, strict=False)
        return left

    def _backbone_options(self) -> dict[str, Any]:
        """The backbone factory's keyword arguments: the CLI and the tests give factories as
        functools.partial; another factory shows none (its defaults apply)."""
        return getattr(self.backbone_factory, "keywords", {})

    def _upcycling(self) -> dict[str, float | int]:
        """The backbone's upcycling options (`upcycle_noise`, `upcycle_reinit`, `seed`), so a dense
        release is upcycled as the backbone's own `pretrained_path` build would."""
        given = self._backbone_options()
        return {k: given[k] for k in ("upcycle_noise", "upcycle_reinit", "seed") if k in given}

    def on_after_backward(self) -> None:
        """Undo the counting of activation checkpointing's forward re-run (DESIGN.md pitfall 8): the
        layers count in every forward, and a recomputed block forwards twice per step."""
        for layer, counts_E in zip(self.moe_layers, self._counts_after_forward):
            layer.pending_counts_E.copy_(counts_E)
        self._counts_after_forward = []

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer step: global expert counts of the step feed routers' bias updates."""
        layers = self.moe_layers
        if not layers:
            return
        counts_LE = global_counts(torch.stack([layer.pending_counts_E for layer in layers]))
        for layer, counts_E in zip(layers, counts_LE):
            if hasattr(layer.router, "update_bias"):
                layer.router.update_bias(counts_E)
            layer.pending_counts_E.zero_()

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = self.optimizer_class(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None

        def schedule(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            if not self.cosine_decay or total is None:
                return 1.0
            progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoints ---------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        """Plain-typed facts a checkpoint must share with the model it loads into."""
        return {
            "schema": self.schema.name,
            "schema_fingerprint": self.schema.fingerprint,
            "num_tags": self.schema.num_tags,
            "num_experts": self.num_experts,
            "moe_layers": len(self.moe_layers),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tagmoe"] = self._identity()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved, mine = checkpoint.get("tagmoe"), self._identity()
        if saved is None:
            raise CheckpointMismatchError("Checkpoint has no 'tagmoe' record: it was not written by tagmoe_lit.")
        diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if diffs:
            raise CheckpointMismatchError(
                "Checkpoint does not match this model (" + "; ".join(diffs) + "); load it with the config it was trained with."
            )
