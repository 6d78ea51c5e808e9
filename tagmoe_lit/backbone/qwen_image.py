"""Qwen-Image MM-DiT (diffusers' `QwenImageTransformer2DModel`) as the TAG-MoE backbone.

We do not rewrite the transformer. This wrapper (1) builds it from a config, deriving the sizes
that depend on other components (token channels from the codec, text width from the text
encoder) in code rather than YAML interpolation (DESIGN.md pitfall 16), or loads it from a local
Qwen-Image checkpoint and checks those sizes against it (`load_transformer`); (2) installs the MoE
layers (`surgery.install_moe`); (3) does Qwen-Image-Edit's conditioning: the reference image's
tokens are appended after the noisy target tokens as a second RoPE frame, and the prediction is
cut back to the target tokens; (4) tells the MoE layers which tokens count for routing statistics,
the signature g and the balance loss (`routing_tokens`): the generated image's (DESIGN.md pitfall
18), or every real image token, the reference's included, as the release's MegaBlocks balance
loss counts every routed token. Blank reference frames (text-to-image samples, dropped
references) never count.

Every sample in a batch must share one token layout (diffusers builds RoPE from `img_shapes[0]`
only), so text-to-image samples carry a blank (all-zero) reference frame.

Legend: B samples, T target tokens, R reference tokens, L text tokens, P token channels.
"""

from __future__ import annotations

import inspect
from typing import Literal

from diffusers import QwenImageTransformer2DModel
import torch
from torch import nn

from tagmoe_lit.backbone.local import component_dir
from tagmoe_lit.backbone.surgery import MoEFactory, install_moe, widen_ffns
from tagmoe_lit.moe.stats import RoutingStats
from tagmoe_lit.moe.upcycle import Upcycling


# The kit's tiny default (CPU) and the released Qwen-Image sizes, for the fields a checkpoint decides.
TINY_SIZES = {"num_layers": 6, "num_attention_heads": 4, "attention_head_dim": 32, "axes_dims_rope": (8, 12, 12)}
QWEN_IMAGE_SIZES = {"num_layers": 60, "num_attention_heads": 24, "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56)}
# What the other components give the full model: VAE tokens (16 latent channels × 2²), Qwen2.5-VL-7B width.
QWEN_IMAGE_IO = {"token_channels": 64, "patch": 2, "out_channels": 16, "text_dim": 3584}


class QwenImageBackbone(nn.Module):
    """A tiny-to-full Qwen-Image MM-DiT with TAG-MoE layers in its last `moe_blocks` blocks.

    With `pretrained_path` the transformer is diffusers' `QwenImageTransformer2DModel` read from a
    local folder (the Qwen-Image root or its `transformer/`); its config decides the sizes, and
    the sizes the codec and text encoder imply must agree with it. Built on the meta device
    (`with torch.device("meta")`), only the folder's config is read: shapes without weights,
    for counting or for a sharded build whose weights are loaded afterwards.
    """

    def __init__(
        self,
        token_channels: int,
        patch: int,
        out_channels: int,
        text_dim: int,
        num_layers: int | None = None,
        num_attention_heads: int | None = None,
        attention_head_dim: int | None = None,
        axes_dims_rope: tuple[int, int, int] | None = None,
        zero_cond_t: bool | None = None,
        pretrained_path: str | None = None,
        moe: MoEFactory | None = None,
        moe_blocks: int = 2,
        widen_tail: int = 1,
        upcycle_noise: float = 0.0,
        upcycle_reinit: float = 0.0,
        gradient_checkpointing: bool = False,
        routing_tokens: Literal["target", "image"] = "target",
        seed: int = 0,
    ):
        """
        Args:
            token_channels: channels of one image token (given by the codec).
            patch: pixel/latent patch side per token (given by the codec).
            out_channels: channels per patch position of the prediction (given by the codec).
            text_dim: width of the text encoder's features (given by the text encoder).
            num_layers: dual-stream blocks (default 6; Qwen-Image: 60; with a checkpoint: its value).
            num_attention_heads: attention heads (default 4; Qwen-Image: 24); width = heads × head dim.
            attention_head_dim: size of one head (default 32; Qwen-Image: 128).
            axes_dims_rope: RoPE dims for (frame, height, width), summing to attention_head_dim
                (default (8, 12, 12); Qwen-Image: (16, 56, 56)).
            zero_cond_t: modulate reference tokens with t = 0 (Qwen-Image-Edit-2511; default true,
                with a checkpoint: its value unless given).
            pretrained_path: local Qwen-Image root folder or its `transformer/` folder; the sizes
                above then come from its config, and any given explicitly must equal it.
            moe: MoE layer factory (dim, hidden) → layer; null keeps the dense FFNs.
            moe_blocks: how many of the last blocks get an MoE image FFN (TAG-MoE: 10 of 60).
            widen_tail: with `moe: null`, make those blocks' image FFNs this many times wider (a dense
                baseline with the MoE's total parameters at widen_tail = num_experts; 1: unchanged).
            upcycle_noise: relative noise added to the experts copied from the dense FFN.
            upcycle_reinit: share of each expert's hidden units re-initialised after copying.
            gradient_checkpointing: recompute block activations in backward to save memory.
            routing_tokens: the tokens that form g, the balance counts and routing statistics:
                `target` (the generated image's) or `image` (target plus real reference tokens, as
                the release's balance loss counts them). All tokens are routed either way.
            seed: seeds upcycling noise / re-init draws.
        """
        super().__init__()
        sizes = {"num_layers": num_layers, "num_attention_heads": num_attention_heads,
                 "attention_head_dim": attention_head_dim, "axes_dims_rope": axes_dims_rope}
        given = {k: (tuple(v) if k == "axes_dims_rope" else v) for k, v in sizes.items() if v is not None}
        implied = {"in_channels": token_channels, "patch_size": patch, "out_channels": out_channels,
                   "joint_attention_dim": text_dim}
        if pretrained_path is None:
            config = {**TINY_SIZES, **given, **implied, "zero_cond_t": True if zero_cond_t is None else zero_cond_t}
            if sum(config["axes_dims_rope"]) != config["attention_head_dim"]:
                raise ValueError(
                    f"axes_dims_rope {config['axes_dims_rope']} must sum to attention_head_dim={config['attention_head_dim']}."
                )
            # out_channels is always explicit: diffusers' default (16) or None would be wrong for a pixel codec
            self.transformer = QwenImageTransformer2DModel(**config)
        else:
            self.transformer = load_transformer(pretrained_path, given, implied, zero_cond_t)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if routing_tokens not in ("target", "image"):
            raise ValueError(f"routing_tokens='{routing_tokens}' is unknown; choose 'target' or 'image'.")
        self.routing_tokens = routing_tokens
        if widen_tail != 1 and (moe or widen_tail < 1):
            raise ValueError(f"widen_tail={widen_tail} widens dense FFNs: it needs moe: null and an integer >= 1.")
        if widen_tail > 1:
            widen_ffns(self.transformer.transformer_blocks, moe_blocks, widen_tail)
        self.pretrained_path = pretrained_path
        self.upcycling = Upcycling(upcycle_noise, upcycle_reinit, seed)
        self.moe_layers = install_moe(
            self.transformer.transformer_blocks, moe_blocks, moe, self.upcycling, pretrained=pretrained_path is not None
        ) if moe else []

    def rebuild_rope(self) -> bool:
        """Recompute RoPE's tables if they are on the meta device; True if it did.

        diffusers' `QwenEmbedRope.pos_freqs` / `neg_freqs` are plain attributes, not buffers, so
        materializing a meta build (`to_empty`, or a strategy's per-module init) leaves them on meta
        (DESIGN.md pitfall 17). They are rebuilt on CPU (diffusers moves them to the input's device at
        forward) and swapped into the same module, so wrappers holding it (FSDP) stay valid.
        """
        rope = self.transformer.pos_embed
        if not (rope.pos_freqs.is_meta or rope.neg_freqs.is_meta):
            return False
        with torch.device("cpu"):
            fresh = type(rope)(theta=rope.theta, axes_dim=rope.axes_dim, scale_rope=rope.scale_rope)
        rope.pos_freqs, rope.neg_freqs = fresh.pos_freqs, fresh.neg_freqs
        return True

    def _apply(self, fn, recurse: bool = True):
        """`to_empty` and other casts go through here: repair RoPE right after (see `rebuild_rope`)."""
        super()._apply(fn, recurse)
        self.rebuild_rope()
        return self

    def dead_ends(self) -> list[nn.Module]:
        """Modules whose output nothing reads: the last block still computes a text-stream output
        (`attn.to_add_out`, then `txt_mlp`) that the image prediction never uses."""
        last = self.blocks[-1]
        return [last.attn.to_add_out, last.txt_mlp]

    @property
    def zero_cond_t(self) -> bool:
        """Reference tokens modulated with t = 0 (Qwen-Image-Edit-2511), not with the target's noisy
        timestep as the TAG-MoE release does (a checkpoint-identity fact: it changes every output)."""
        return bool(self.transformer.config.get("zero_cond_t", False))

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (what FSDP wraps and activation checkpointing re-runs)."""
        return self.transformer.transformer_blocks

    def forward(
        self,
        noisy_BTP: torch.Tensor,
        reference_BRP: torch.Tensor | None,
        grid_hw: tuple[int, int],
        text_BLD: torch.Tensor,
        text_mask_BL: torch.Tensor | None,
        sigma_B: torch.Tensor,
        context_BC: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RoutingStats | None]:
        """Predict the flow velocity for the target tokens; also return the MoE routing record.

        `context_BC` (the tag embedding s) reaches only routers that declare `needs_context` (the
        tag-conditioned oracle); TAG-MoE's own routers never see tags."""
        B, T, _ = noisy_BTP.shape
        frames = [(1, *grid_hw)]
        x_BSP = noisy_BTP
        if reference_BRP is not None:
            frames.append((1, *grid_hw))
            x_BSP = torch.cat([noisy_BTP, reference_BRP], dim=1)  # (B, T+R, P)
        token_mask_BS = torch.zeros(B, x_BSP.shape[1], dtype=torch.bool, device=x_BSP.device)
        token_mask_BS[:, :T] = True  # the generated image's tokens
        if reference_BRP is not None and self.routing_tokens == "image":
            token_mask_BS[:, T:] = (reference_BRP != 0).flatten(1).any(1, keepdim=True)  # blank frames are all zero
        for layer in self.moe_layers:
            layer.set_routing_inputs(token_mask_BS, context_BC)
        if text_mask_BL is not None and bool(text_mask_BL.all()):
            text_mask_BL = None  # no padding: let attention take the unmasked (faster) path
        out_BSP = self.transformer(
            hidden_states=x_BSP,
            encoder_hidden_states=text_BLD,
            encoder_hidden_states_mask=text_mask_BL,
            timestep=sigma_B,
            img_shapes=[frames] * B,
            return_dict=False,
        )[0]
        stats = RoutingStats([layer.routing for layer in self.moe_layers]) if self.moe_layers else None
        return out_BSP[:, :T], stats


def load_transformer(
    pretrained_path: str, given: dict, implied: dict, zero_cond_t: bool | None
) -> QwenImageTransformer2DModel:
    """The local checkpoint's transformer (config only on the meta device), after checking that the
    sizes the kit config gives or implies agree with the checkpoint's config, all in one error."""
    folder = component_dir(pretrained_path, "transformer", "QwenImageBackbone")
    config = QwenImageTransformer2DModel.load_config(folder)
    checkpoint = {k: config.get(k, default) for k, default in _init_defaults().items()}
    checkpoint["axes_dims_rope"] = tuple(checkpoint["axes_dims_rope"])
    checkpoint["out_channels"] = checkpoint["out_channels"] or checkpoint["in_channels"]  # diffusers' fallback
    sources = {**{k: "backbone config" for k in given}, "in_channels": "codec token_channels",
               "patch_size": "codec patch", "out_channels": "codec channels", "joint_attention_dim": "text encoder dim"}
    problems = [
        f"{k}: {sources[k]} {v} vs checkpoint {checkpoint[k]}"
        for k, v in {**given, **implied}.items()
        if v != checkpoint[k]
    ]
    if problems:
        raise ValueError(
            f"QwenImageBackbone: the config does not match the checkpoint in {folder} ({'; '.join(problems)}); "
            "drop the backbone sizes from the config (the checkpoint decides them) and use the codec and text "
            "encoder of the same Qwen-Image release."
        )
    overrides = {} if zero_cond_t is None else {"zero_cond_t": zero_cond_t}
    if torch.get_default_device().type == "meta":
        return QwenImageTransformer2DModel.from_config(config, **overrides)
    return QwenImageTransformer2DModel.from_pretrained(folder, local_files_only=True, **overrides)


def _init_defaults() -> dict:
    """`QwenImageTransformer2DModel`'s constructor defaults: a config.json may omit a field left at its default."""
    params = inspect.signature(QwenImageTransformer2DModel.__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}
