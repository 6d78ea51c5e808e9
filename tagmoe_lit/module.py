"""`TagMoEModule`: composes backbone, MoE, alignment and flow matching into one training step.

No component math, no parallelism; one concept per file: `objective.py` (draws, loss terms),
`evaluation.py`, `generation.py`, `optim.py`, `identity.py`, `trainable.py` / `quantize.py`,
`distributed/` (FSDP2, meta materialization, starting weights), `moe/expert_counts.py`.
A training step reads like DiT's loop:

    draws = objective.training_draws(...)       # a generator per sample: bit-exact resume, any world size
    v̂, routing = backbone(x_σ, reference, text, σ)
    terms = objective.loss_terms(v̂, x0, ε, routing, head, s)

Components are built in `configure_model` (from factories: a large backbone is never built at parse
time). Forwards that compute routing terms publish `routing`, a `RoutingRecord`; callbacks read
that attribute and nothing else.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from tagmoe_lit.align import MLPHead, SumTagEmbedder
from tagmoe_lit.backbone import FrozenTextEncoder, PixelCodec, QwenImageBackbone
from tagmoe_lit.distributed.clip import clip_gradients
from tagmoe_lit.distributed.weights import StartingWeights
from tagmoe_lit.distributed.wrap import wrap_model
from tagmoe_lit.evaluation import Evaluation
from tagmoe_lit.flow import TimestepSampler, interpolate
from tagmoe_lit.generation import generate
from tagmoe_lit.identity import check_checkpoint, model_identity
from tagmoe_lit.moe import MoELayer, RoutingRecord, RoutingStats
from tagmoe_lit.moe.expert_counts import end_step, reset_counts
from tagmoe_lit.objective import Draws, FlowObjective, check_finite, conditioning, flow_by_sigma_quartile
from tagmoe_lit.optim import AdamW, WarmupCosine, build_optimizer
from tagmoe_lit.protocols import Backbone, BackboneFactory, Codec, Head, HeadFactory, TagEmbedder, TagEmbedderFactory, TextEncoder
from tagmoe_lit.lora import LoRA, seed_dropout
from tagmoe_lit.quantize import QuantMode
from tagmoe_lit.sampling import EulerSampler, FlowSampler
from tagmoe_lit.tags import TagSchema
from tagmoe_lit.trainable import check_options, settle_parameters


class TagMoEModule(L.LightningModule):
    """TAG-MoE on a Qwen-Image MM-DiT, trained by rectified flow on editing + generation data."""

    def __init__(
        self,
        schema: str = "synthtag",
        backbone: BackboneFactory = QwenImageBackbone,
        text_encoder: TextEncoder | None = None,
        codec: Codec | None = None,
        tag_embedder: TagEmbedderFactory | None = SumTagEmbedder,
        head: HeadFactory = MLPHead,
        timesteps: TimestepSampler | None = None,
        sampler: FlowSampler | None = None,
        lambda_lb: float = 0.01,
        lambda_align: float = 1.0,
        lambda_z: float = 0.0,
        text_dropout: float = 0.1,
        reference_dropout: float = 0.05,
        optimizer: OptimizerCallable = AdamW,
        warmup_steps: int = 50,
        cosine_decay: bool = True,
        min_lr_ratio: float = 0.1,
        seed: int = 0,
        sample_in_test: bool = True,
        align_dropped_text: bool = False,
        trainable: Literal["all", "moe_tail"] = "all",
        quantize_frozen: QuantMode | None = None,
        meta_init: bool = False,
        init_weights: str | None = None,
        lora: LoRA | None = None,
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
            sampler: image sampler of `predict`, `test`, `edit` (default: 30 Euler steps, CFG 4; `QwenImageSampler`: the release's).
            lambda_lb: weight of the load-balancing loss (official: 0.01).
            lambda_align: weight of the alignment loss (paper: unpublished; default 1.0).
            lambda_z: weight of the router z-loss (ST-MoE uses 1e-3; logged even at 0).
            text_dropout: probability of training a sample with the empty instruction (for CFG).
            reference_dropout: probability of training an edit with a blank reference frame.
            optimizer: the optimizer by `class_path` with its own `init_args` (lr, betas, …): any torch
                optimizer, or bitsandbytes' 8-bit-state bitsandbytes.optim.AdamW8bit / PagedAdamW8bit
                (paging needs CUDA; on CPU it runs unpaged). Its `lr` is the schedule's peak.
            warmup_steps: linear warmup steps.
            cosine_decay: decay to `min_lr_ratio`·lr over `trainer.max_steps` after warmup.
            min_lr_ratio: final learning rate as a fraction of the optimizer's lr.
            seed: seeds the per-step noise / σ / dropout generator (with step and rank).
            align_dropped_text: also align samples trained without their instruction (default: they add 0).
            sample_in_test: `test` also samples every test image and scores the edits against exact targets
                (data modules with `exact_targets`: SynthTAG; slow); off: fixed-noise flow losses only.
            trainable: all, or moe_tail (only MoE layers, tag embedder and head learn).
            quantize_frozen: int8 or nf4 storage (bitsandbytes) of the frozen text encoder and, with
                moe_tail, of the blocks without MoE (single-process / DDP only; null: full precision).
            meta_init: build on the meta device, then allocate where the strategy places (and shards)
                them with every module's declared init; weights from `init_weights` or `--ckpt_path`.
            init_weights: weights to start from, loaded once built and sharded (`--ckpt_path` wins): a dense
                diffusers Qwen-Image folder (experts upcycled from its FFNs) or a `convert` directory.
            lora: low-rank adapters on a frozen backbone (`lora.py`); with quantize_frozen, QLoRA.
        """
        super().__init__()
        self.schema = TagSchema.load(schema)
        self.backbone_factory, self.tag_embedder_factory, self.head_factory = backbone, tag_embedder, head
        self.text_encoder = text_encoder if text_encoder is not None else FrozenTextEncoder()
        self.codec = codec if codec is not None else PixelCodec()
        self.objective = FlowObjective(timesteps, lambda_lb, lambda_align, lambda_z, text_dropout, reference_dropout, seed,
                                       align_dropped_text)
        self.sampler = sampler if sampler is not None else EulerSampler()
        self.optimizer_factory, self.sample_in_test = optimizer, sample_in_test
        self.warmup_steps, self.cosine_decay, self.min_lr_ratio = warmup_steps, cosine_decay, min_lr_ratio
        check_options(trainable, quantize_frozen, meta_init, init_weights, lora is not None, tuple(lora.targets) if lora else ())
        self.trainable, self.quantize_frozen, self.meta_init, self.lora = trainable, quantize_frozen, meta_init, lora
        self.weights, self.evaluation = StartingWeights(init_weights), Evaluation()
        self.backbone: Backbone | None = None
        self.tag_embedder: TagEmbedder | None = None
        self.head: Head | None = None
        self.routing: RoutingRecord | None = None
        self.test_summary: dict | None = None  # the last `test`'s per-task tables (TaskReport.summary)
        self.test_report_name: str | None = "test_report"  # files `test` writes; None: keep it in memory

    # -- building ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:  # refuse a missing init_weights before a full-size build
        self.weights.check_exists()

    def configure_model(self) -> None:
        """Build the components once (idempotent: Lightning may call it again), freeze and quantize
        them as configured, then hand them to `distributed.wrap_model` (FSDP2 under a device mesh,
        materialization of a meta build under a trainer; without one a meta build stays on meta)."""
        if self.backbone is not None:
            return
        with torch.device("meta") if self.meta_init else nullcontext():
            self.backbone = self.backbone_factory(
                self.codec.token_channels, self.codec.patch, self.codec.channels, self.text_encoder.dim
            )
            if self.has_moe and self.tag_embedder_factory is not None:
                self.tag_embedder = self.tag_embedder_factory(self.schema.num_tags)
                self.head = self.head_factory(self.num_experts, self.tag_embedder.dim)
        if self.meta_init:
            self.weights.refuse_dropped(self.backbone)
        self.weights.record_shapes(self)
        settle_parameters(self, sharded=self.device_mesh is not None)
        others = [p for p in (self.tag_embedder, self.head) if p is not None]
        strategy = self._trainer.strategy if self._trainer is not None else None
        wrap_model(self.backbone, others, self.device_mesh, strategy, self.meta_init)

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The backbone's MoE layers in block order (empty for a dense or unbuilt backbone)."""
        return list(self.backbone.moe_layers) if self.backbone is not None else []

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

    def velocity(self, noisy: torch.Tensor, reference: torch.Tensor, grid: tuple[int, int], instructions: list[str],
                 sigma: torch.Tensor, tag_embedding: torch.Tensor | None = None) -> tuple[torch.Tensor, RoutingStats | None]:
        """Backbone call with text encoding: the one forward training and sampling share (`tag_embedding`
        s reaches only routers that declare `needs_context`)."""
        self.backbone.rebuild_rope()  # a strategy that materializes module by module (FSDP1) never calls its _apply
        text, text_mask = self.text_encoder(instructions, device=noisy.device)
        return self.backbone(noisy, reference, grid, text.to(noisy.dtype), text_mask, sigma.to(noisy.device), tag_embedding)

    def tag_embedding(self, batch: dict) -> torch.Tensor | None:
        """s = Σ tag embeddings of each sample, or None without a tag embedder."""
        return self.tag_embedder(batch["tags"]) if self.tag_embedder is not None else None

    def encode_images(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Target and source image tokens (x0, source); encode once when several forwards share a batch."""
        return self.codec.encode(batch["target"]), self.codec.encode(batch["source"])

    def fixed_noise(self, batch: dict, purpose: str) -> torch.Tensor:
        """ε per sample, seeded by (seed, purpose, sample index): independent of batch-mates and ranks."""
        h, w = self.grid(x := batch["target"])
        return self.objective.fixed_noise(batch["index"].tolist(), purpose, (h * w, self.codec.token_channels), x)

    def training_draws(self, x: torch.Tensor, batch_idx: int) -> Draws:
        """σ, ε and dropouts of a training batch, by the samples' positions in the step's global batch."""
        micro, world = (batch_idx % self.trainer.accumulate_grad_batches, self.trainer.world_size) if self._trainer else (0, 1)
        h, w = self.grid(x)
        first = (micro * world + self.global_rank) * x.shape[0]
        return self.objective.training_draws(x.shape[0], (h * w, self.codec.token_channels), x, self.global_step, first)

    def loss_terms(self, batch: dict, sigma: torch.Tensor, noise: torch.Tensor, drop_text: torch.Tensor, drop_ref: torch.Tensor,
                   images: tuple[torch.Tensor, torch.Tensor] | None = None, routing_terms: bool = True) -> dict[str, torch.Tensor]:
        """All loss terms of one forward (`objective.loss_terms`); with `routing_terms` it publishes routing.
        `images` takes `encode_images(batch)` when the caller already has it."""
        if batch["tags"].shape[1] != self.schema.num_tags:
            raise ValueError(f"Batch tags have {batch['tags'].shape[1]} ids but the model's schema {self.schema.name} has "
                             f"{self.schema.num_tags}; use the same `schema` for data and model.")
        x0, source_tokens = images if images is not None else self.encode_images(batch)
        instructions, reference = conditioning(batch, source_tokens, drop_text, drop_ref)
        s = self.tag_embedding(batch)
        pred, stats = self.velocity(interpolate(x0, noise, sigma), reference, self.grid(batch["target"]), instructions, sigma, s)
        terms, align_B = self.objective.loss_terms(pred, x0, noise, stats, self.head, s, drop_text, routing_terms)
        if stats is not None and routing_terms:
            detached = (None if s is None else s.detach(), None if align_B is None else 1.0 - align_B.detach())
            self.routing = RoutingRecord(stats.detached(), batch["task"].detach(), batch["tags"].detach(), *detached)
        return terms

    def generate(self, batch: dict, sampler: FlowSampler | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images and per-layer routing signatures sampled for a batch (`generation.generate`)."""
        return generate(self, batch, sampler or self.sampler)

    # -- loops ---------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["target"]
        B = x.shape[0]
        draws = self.training_draws(x, batch_idx)
        seed_dropout(self.backbone, draws.seeds)  # LoRA's dropout masks (nothing to seed without adapters)
        terms = self.loss_terms(batch, draws.sigma_B.to(x.device), draws.noise_BTP, draws.drop_text_B, draws.drop_ref_B)
        check_finite(terms, self.global_step)
        per_sample = terms.pop("flow_per_sample")
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=B)
        self.log_dict(flow_by_sigma_quartile(draws.sigma_B, per_sample, "train/"), batch_size=B)  # minRF's lossbin view
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation.step(self, batch)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.evaluation.epoch_metrics("val"))

    def on_test_epoch_start(self) -> None:
        data = self.trainer.datamodule
        self.evaluation.start_test(data.task_names if data is not None else None)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        exact = getattr(self.trainer.datamodule, "exact_targets", False)  # a data module's optional declaration
        self.evaluation.test_step(self, batch, score_edits=self.sample_in_test and exact)

    def on_test_epoch_end(self) -> None:
        """Log per-task test metrics and write `test_report.{json,md}` into the run's log directory."""
        self._log_epoch(self.evaluation.epoch_metrics("test"))
        self.test_summary = self.evaluation.finish_test(self, self.test_report_name)

    def _log_epoch(self, metrics: dict[str, float]) -> None:
        if self.trainer.sanity_checking:  # Lightning drops self.log here; keep the step-0 reference
            for logger in self.loggers:
                logger.log_metrics(metrics, step=0)
        else:
            self.log_dict(metrics, sync_dist=True)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:  # for callbacks.PredictionWriter
        images, signature_LBE = self.generate(batch)
        return {"images": images, "signature_LBE": signature_LBE}

    # -- starting weights, expert counts, optimizer, checkpoints -------------------------------
    def on_validation_start(self) -> None:  # fit's sanity check comes before on_train_start
        self.weights.settle(self)

    on_test_start = on_predict_start = on_validation_start

    def on_train_start(self) -> None:
        """Start from `init_weights` (if no sanity check did) with no pending expert counts."""
        self.on_validation_start()
        reset_counts(self.moe_layers)

    def load_init_weights(self) -> list[str]:
        """Load `init_weights` into the built module now; return the parts left as built."""
        self.configure_model()
        return self.weights.load(self, self.trainer.model if self._trainer is not None else self)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        end_step(self.moe_layers)  # once per optimizer step: global counts → bias routers, then reset

    configure_gradient_clipping = clip_gradients  # Lightning's, with the global norm across device meshes (EP)

    def configure_optimizers(self) -> dict[str, Any]:
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        schedule = WarmupCosine(self.warmup_steps, self.cosine_decay, self.min_lr_ratio, total)
        return build_optimizer(self.optimizer_factory, [p for p in self.parameters() if p.requires_grad], schedule)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tagmoe"] = model_identity(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint(checkpoint.get("tagmoe"), self)
