"""Qwen-Image MM-DiT (diffusers' `QwenImageTransformer2DModel`) as the TAG-MoE backbone.

We do not rewrite the transformer. This wrapper (1) builds it from a config, deriving the sizes
that depend on other components (token channels from the codec, text width from the text
encoder) in code rather than YAML interpolation (DESIGN.md pitfall 16); (2) installs the MoE
layers (`surgery.install_moe`); (3) does Qwen-Image-Edit's conditioning: the reference image's
tokens are appended after the noisy target tokens as a second RoPE frame, and the prediction is
cut back to the target tokens; (4) tells the MoE layers which tokens are the generated image's,
so only those form routing statistics and the signature (DESIGN.md pitfall 18).

Every sample in a batch must share one token layout (diffusers builds RoPE from `img_shapes[0]`
only), so text-to-image samples carry a blank (all-zero) reference frame.

Legend: B samples, T target tokens, R reference tokens, L text tokens, P token channels.
"""

from __future__ import annotations

from diffusers import QwenImageTransformer2DModel
import torch
from torch import nn

from tagmoe_lit.backbone.surgery import MoEFactory, install_moe
from tagmoe_lit.moe.stats import RoutingStats


class QwenImageBackbone(nn.Module):
    """A tiny-to-full Qwen-Image MM-DiT with TAG-MoE layers in its last `moe_blocks` blocks."""

    def __init__(
        self,
        token_channels: int,
        patch: int,
        out_channels: int,
        text_dim: int,
        num_layers: int = 6,
        num_attention_heads: int = 4,
        attention_head_dim: int = 32,
        axes_dims_rope: tuple[int, int, int] = (8, 12, 12),
        zero_cond_t: bool = True,
        moe: MoEFactory | None = None,
        moe_blocks: int = 2,
        upcycle_noise: float = 0.0,
        upcycle_reinit: float = 0.0,
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ):
        """
        Args:
            token_channels: channels of one image token (given by the codec).
            patch: pixel/latent patch side per token (given by the codec).
            out_channels: channels per patch position of the prediction (given by the codec).
            text_dim: width of the text encoder's features (given by the text encoder).
            num_layers: dual-stream blocks (Qwen-Image: 60).
            num_attention_heads: attention heads (Qwen-Image: 24); width = heads × head dim.
            attention_head_dim: size of one head (Qwen-Image: 128).
            axes_dims_rope: RoPE dims for (frame, height, width); must sum to attention_head_dim.
            zero_cond_t: modulate reference tokens with t = 0 (Qwen-Image-Edit-2511).
            moe: MoE layer factory (dim, hidden) → layer; null keeps the dense FFNs.
            moe_blocks: how many of the last blocks get an MoE image FFN (TAG-MoE: 10 of 60).
            upcycle_noise: relative noise added to the experts copied from the dense FFN.
            upcycle_reinit: share of each expert's hidden units re-initialised after copying.
            gradient_checkpointing: recompute block activations in backward to save memory.
            seed: seeds upcycling noise / re-init draws.
        """
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {tuple(axes_dims_rope)} must sum to attention_head_dim={attention_head_dim}."
            )
        self.transformer = QwenImageTransformer2DModel(
            patch_size=patch,
            in_channels=token_channels,
            out_channels=out_channels,  # set explicitly: the default (16) or None would be wrong here
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=text_dim,
            axes_dims_rope=tuple(axes_dims_rope),
            zero_cond_t=zero_cond_t,
        )
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.moe_layers = (
            install_moe(self.transformer.transformer_blocks, moe_blocks, moe, upcycle_noise, upcycle_reinit, seed)
            if moe
            else []
        )

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
    ) -> tuple[torch.Tensor, RoutingStats | None]:
        """Predict the flow velocity for the target tokens; also return the MoE routing record."""
        B, T, _ = noisy_BTP.shape
        frames = [(1, *grid_hw)]
        x_BSP = noisy_BTP
        if reference_BRP is not None:
            frames.append((1, *grid_hw))
            x_BSP = torch.cat([noisy_BTP, reference_BRP], dim=1)  # (B, T+R, P)
        token_mask_BS = torch.zeros(B, x_BSP.shape[1], dtype=torch.bool, device=x_BSP.device)
        token_mask_BS[:, :T] = True  # the generated image's tokens
        for layer in self.moe_layers:
            layer.token_mask = token_mask_BS
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
        stats = RoutingStats([layer.last for layer in self.moe_layers]) if self.moe_layers else None
        return out_BSP[:, :T], stats
