"""`RoutingStats`: the small record MoE layers publish on every forward.

Losses and callbacks read this record and nothing else from the layers (no private attributes).
Each layer *overwrites* its record on every forward (`MoELayer.routing`); the only counts that
accumulate across forwards, for the optimizer step, belong to `ExpertCounts` (`expert_counts.py`),
which ignores activation checkpointing's re-run of the forward (DESIGN.md pitfall 8).
Only tokens selected by the layer's token mask (the generated image's tokens) are counted.

`RoutingRecord` is what the LightningModule publishes for callbacks after each forward: the
routing stats plus who the samples were (task ids, tags) and how well the alignment head read
their routing.

Legend: B samples, E experts, V tags, D tag-embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerRouting:
    """One MoE layer, one forward."""

    probs_mean_E: torch.Tensor  # mean router probability per expert over counted tokens (grad) — P_e
    counts_E: torch.Tensor  # top-k assignments per expert over counted tokens, this forward (no grad)
    step_counts_E: torch.Tensor  # the same summed over this optimizer step's micro-batches so far (no grad)
    signature_BE: torch.Tensor  # per-sample mean router probabilities over its counted tokens (grad)
    top1_counts_BE: torch.Tensor  # per-sample count of counted tokens whose top-1 expert is e (no grad)
    entropy: torch.Tensor  # mean per-token router entropy in nats (no grad)
    z_loss: torch.Tensor  # mean squared log-sum-exp of the router logits over counted tokens (grad)

    @property
    def load_E(self) -> torch.Tensor:
        """Fraction of token assignments each expert received (sums to 1)."""
        return self.counts_E / self.counts_E.sum().clamp_min(1.0)


@dataclass
class RoutingStats:
    """All MoE layers of one forward, in block order."""

    layers: list[LayerRouting]

    @property
    def num_experts(self) -> int:
        return self.layers[0].probs_mean_E.numel()

    def detached(self) -> "RoutingStats":
        """A copy without autograd history, safe to keep after the step (for callbacks)."""
        return RoutingStats(
            [LayerRouting(*(t.detach() for t in vars(layer).values())) for layer in self.layers]
        )


@dataclass
class RoutingRecord:
    """The module's published view of one batch's routing (all tensors detached)."""

    stats: RoutingStats
    task_B: torch.Tensor  # task id per sample (index into the data module's `task_names`)
    tags_BV: torch.Tensor  # multi-hot tags
    semantic_BD: torch.Tensor | None = None  # s, the summed tag embeddings (None without alignment)
    align_cos_B: torch.Tensor | None = None  # cos(H(g), s) per sample

    @property
    def signature_LBE(self) -> torch.Tensor:
        """Per-layer routing signatures, stacked: [layers, B, E]."""
        return torch.stack([layer.signature_BE for layer in self.stats.layers])
