"""TAG-MoE's training objective: the random draws of a step and the weighted loss terms.

    σ, ε, drop_text, drop_ref ~ one generator per sample, seeded by (seed, step, position)
    x_σ = (1 − σ)·x0 + σ·ε                                 # flow.interpolate
    L = L_flow + λ_lb·L_lb + λ_z·L_z + λ_align·mean_b keep_b·(1 − cos(H(g_b), s_b))

keep_b is 0 for a sample trained without its instruction (CFG dropout): it cannot infer its task,
so it is not asked to route by it. The mean stays over the whole batch, so any split of the global
batch over ranks and micro-batches gives the same gradient.

The network call sits between `training_draws` and `loss_terms` and belongs to the caller
(`TagMoEModule.loss_terms`): this file holds the math, as DiT's diffusion object does. Every draw
comes from an explicit CPU generator, so a sample's σ and noise depend neither on its batch-mates
nor on how the global batch is split over ranks and micro-batches, and a resumed run draws what a
straight one does (DESIGN.md pitfall 14).

Legend: B samples, T target tokens, P token channels, E experts, D tag width.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from tagmoe_lit.align import alignment_baselines, alignment_loss, routing_signature
from tagmoe_lit.flow import LogitNormalSampler, TimestepSampler, flow_loss
from tagmoe_lit.moe import RoutingStats, load_balancing_loss, router_z_loss
from tagmoe_lit.protocols import Head


def step_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and names, stable across machines and Python runs."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)


@dataclass
class Draws:
    """One training batch's random choices, all on the CPU."""

    sigma_B: torch.Tensor  # noise level per sample
    noise_BTP: torch.Tensor  # ε in token space (on the images' device and dtype)
    drop_text_B: torch.Tensor  # train with the empty instruction (for CFG)
    drop_ref_B: torch.Tensor  # train an edit with a blank reference frame
    seeds: list[int]  # each sample's step seed (its other draws, e.g. LoRA dropout, start from it)


class FlowObjective:
    """Rectified flow plus TAG-MoE's balance and alignment terms, with the draws they need."""

    def __init__(
        self,
        timesteps: TimestepSampler | None = None,
        lambda_lb: float = 0.01,
        lambda_align: float = 1.0,
        lambda_z: float = 0.0,
        text_dropout: float = 0.1,
        reference_dropout: float = 0.05,
        seed: int = 0,
        align_dropped_text: bool = False,
    ):
        self.align_dropped_text = align_dropped_text
        self.timesteps = timesteps if timesteps is not None else LogitNormalSampler()
        self.lambda_lb, self.lambda_align, self.lambda_z = lambda_lb, lambda_align, lambda_z
        self.text_dropout, self.reference_dropout = text_dropout, reference_dropout
        self.seed = seed

    @staticmethod
    def _noise(shape_TP: tuple[int, int], like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """ε [1, T, P] drawn on CPU from `generator` (the same on any device), then moved like `like`."""
        return torch.randn(1, *shape_TP, generator=generator).to(like)

    def training_draws(self, B: int, shape_TP: tuple[int, int], like: torch.Tensor, step: int, first: int) -> Draws:
        """σ, ε and the two dropouts of B samples that sit at positions first … first + B − 1 of step
        `step`'s global batch (micro-batch m of A on rank r of W holds (m·W + r)·B …, the data
        modules' layout), so 2 ranks × B draw exactly what 1 rank × 2B does."""
        sigma, noise, drop_text, drop_ref = [], [], [], []
        seeds = [step_seed(self.seed, "train", step, first + i) for i in range(B)]
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            sigma.append(self.timesteps(1, gen))
            noise.append(self._noise(shape_TP, like, gen))
            drop_text.append(torch.rand(1, generator=gen) < self.text_dropout)
            drop_ref.append(torch.rand(1, generator=gen) < self.reference_dropout)
        return Draws(torch.cat(sigma), torch.cat(noise), torch.cat(drop_text), torch.cat(drop_ref), seeds)

    def fixed_noise(self, indices: list[int], purpose: str, shape_TP: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """ε per sample seeded by (seed, purpose, the sample's dataset index): the same for a sample
        whatever its batch, rank or run ("eval" for fixed-noise losses, "sample" for generation)."""
        return torch.cat([
            self._noise(shape_TP, like, torch.Generator().manual_seed(step_seed(self.seed, purpose, i))) for i in indices
        ])

    def loss_terms(
        self,
        pred_BTP: torch.Tensor,
        x0_BTP: torch.Tensor,
        noise_BTP: torch.Tensor,
        stats: RoutingStats | None,
        head: Head | None,
        s_BD: torch.Tensor | None,
        drop_text_B: torch.Tensor | None = None,
        routing_terms: bool = True,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The loss terms of one forward (`loss` is the weighted total) and the per-sample alignment
        loss [B] (None without alignment; unmasked, for per-task views).

        `routing_terms=False` keeps the flow terms only: no balance loss, so no all-reduce of the
        expert counts (evaluation forwards whose routing nobody reads).
        """
        per_sample = flow_loss(pred_BTP, x0_BTP, noise_BTP)
        terms = {"flow": per_sample.mean(), "flow_per_sample": per_sample.detach()}
        loss, align_B = terms["flow"], None
        if stats is not None and routing_terms:
            terms["lb"] = load_balancing_loss(stats)
            terms["z"] = router_z_loss(stats)
            loss = loss + self.lambda_lb * terms["lb"] + self.lambda_z * terms["z"]
            if s_BD is not None:
                g_BE = routing_signature(stats)
                align_B = alignment_loss(head(g_BE), s_BD)
                keep_B = torch.ones_like(align_B)
                if drop_text_B is not None and not self.align_dropped_text:
                    keep_B = (~drop_text_B).to(align_B)
                terms["align"] = (align_B * keep_B).mean()
                terms.update(alignment_baselines(head, g_BE.detach(), s_BD.detach(), keep_B))
                loss = loss + self.lambda_align * terms["align"]
            terms["router_entropy"] = torch.stack([layer.entropy for layer in stats.layers]).mean()
        terms["loss"] = loss
        return terms, align_B


def check_finite(terms: dict[str, torch.Tensor], step: int) -> None:
    """Stop a run whose loss is NaN or infinite, naming every scalar term and the fix."""
    if not torch.isfinite(terms["loss"]):
        scalars = {k: round(v.item(), 4) for k, v in terms.items() if v.dim() == 0}
        raise FloatingPointError(f"Training loss is {terms['loss'].item()} at step {step} (terms: {scalars}); lower the "
                                 "optimizer's lr (model.optimizer.init_args.lr) or check the data.")


def conditioning(batch: dict, source_tokens: torch.Tensor, drop_text: torch.Tensor,
                 drop_ref: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Instructions and reference tokens, blanked where dropped (blank frame = zero tokens)."""
    instructions = ["" if d else t for t, d in zip(batch["instruction"], drop_text.tolist())]
    keep = (batch["has_source"] & ~drop_ref.to(batch["has_source"].device)).to(source_tokens.dtype)
    return instructions, source_tokens * keep[:, None, None]


def flow_by_sigma_quartile(sigma_B: torch.Tensor, flow_B: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """Mean flow loss of the samples in each σ quartile present (minRF's binned loss view)."""
    bins = (sigma_B * 4).long().clamp(max=3)
    return {f"{prefix}flow_sigma_q{b}": flow_B[bins.to(flow_B.device) == b].mean() for b in bins.unique().tolist()}
