"""The written contracts of the components a team swaps by `class_path` (STYLE.md, "Applied" 14).

`TagMoEModule` types its arguments with these protocols and calls nothing else on the components:
a user's implementation in their own module works when it provides what is listed here (the tests
plug in one of each, defined in the test file). Optional router capabilities are protocols too
(`moe.expert_counts.BiasBalanced`); the module never probes attributes with `hasattr`.

Methods are `forward`s (an `nn.Module` is called through it) with positional-only, unannotated
tensors: jsonargparse checks a `class_path` against a protocol by signature, and would demand the
same names and annotations. Shapes are in each docstring. Legend: B samples, T target tokens,
R reference tokens, L text tokens, P token channels, D widths, E experts, V tags, C router context.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from torch import nn

from tagmoe_lit.moe.layer import MoELayer, RouterFactory  # (dim, num_experts) → Router; the layer owns it
from tagmoe_lit.moe.upcycle import Upcycling


@runtime_checkable
class Backbone(Protocol):
    """The MM-DiT: noisy target tokens + reference tokens + text → velocity of the target tokens."""

    moe_layers: list[MoELayer]  # in block order; empty for a dense backbone
    pretrained_path: str | None  # the local release it was built from (a meta build must not drop it)
    upcycling: Upcycling  # how dense FFN weights become experts (also for `model.init_weights`)
    zero_cond_t: bool  # reference tokens modulated with t = 0, not the target's σ (checkpoint identity)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks: what FSDP shards and activation checkpointing recomputes."""

    def dead_ends(self) -> list[nn.Module]:
        """Modules whose output never reaches the prediction (frozen, so DDP sees no unused parameter)."""

    def rebuild_rope(self) -> bool:
        """Recompute tables that are plain attributes (not buffers) and so stay on the meta device
        through materialization; True if it did (a backbone without such tables returns False)."""

    def forward(self, noisy_BTP, reference_BRP, grid_hw, text_BLD, text_mask_BL, sigma_B, context_BC=None, /) -> Any:
        """→ (velocity [B, T, P], `RoutingStats` or None). Inputs: noisy target tokens [B, T, P],
        reference tokens [B, R, P] or None, the (h, w) token grid, text [B, L, D], its bool mask
        [B, L] or None (no padding), σ [B], and the per-sample router context [B, C] or None."""


@runtime_checkable
class Codec(Protocol):
    """Images in [0, 1] ↔ image tokens (pixels packed, or VAE latents)."""

    channels: int  # channels per patch position of the prediction
    patch: int  # latent/pixel patch side per token
    downsample: int  # image pixels per token side

    @property
    def token_channels(self) -> int: ...

    def encode(self, images_B3HW, /) -> Any:
        """→ tokens [B, T, P]."""

    def decode(self, tokens_BTP, h, w, /) -> Any:
        """→ images [B, 3, H, W] in [0, 1] from an h × w token grid."""


@runtime_checkable
class TextEncoder(Protocol):
    """Instructions → per-token features and their mask (frozen: the module never trains it)."""

    dim: int  # feature width D

    def forward(self, instructions, /, device="cpu") -> Any:
        """→ (features [B, L, D], bool mask [B, L]) on `device`, for a list of B strings."""

    def frozen_model(self) -> Any:
        """The frozen network held outside the module tree, for 8/4-bit storage; None if there is none."""


@runtime_checkable
class Router(Protocol):
    """Token features → expert logits (the layer applies softmax and top-k; see `moe/routers.py`)."""

    needs_context: bool  # True: called as router(x_ND, context_NC)

    def forward(self, x_ND, /, *context_NC) -> Any:
        """→ logits [N, E] (any dtype; the layer runs the router in fp32)."""


@runtime_checkable
class TagEmbedder(Protocol):
    """Multi-hot tags → the semantic vector s."""

    dim: int  # width D of s

    def forward(self, tags_BV, /) -> Any:
        """→ s [B, D] from multi-hot tags [B, V]."""


@runtime_checkable
class Head(Protocol):
    """The prediction head H: routing signature g → the tag space."""

    def forward(self, g_BE, /) -> Any:
        """→ [B, D], compared with s by cosine."""


__all__ = ["Backbone", "BackboneFactory", "Codec", "Head", "HeadFactory", "Router", "RouterFactory", "TagEmbedder",
           "TagEmbedderFactory", "TextEncoder"]

# Factories return plain modules in the signatures LightningCLI reads (jsonargparse checks a factory's
# class against its return type by subclassing, which a protocol is not); what they build is the protocol.
BackboneFactory = Callable[[int, int, int, int], nn.Module]  # (token_channels, patch, out_channels, text_dim) → Backbone
TagEmbedderFactory = Callable[[int], nn.Module]  # (num_tags) → TagEmbedder
HeadFactory = Callable[[int, int], nn.Module]  # (num_experts, tag_dim) → Head
