"""Latent codecs: images ↔ the image-stream tokens the MM-DiT sees.

Qwen-Image packs 2×2 patches of its 16-channel VAE latents into 64-channel tokens. A codec here
does the same for any channel count: `PixelCodec` packs raw pixels (no VAE: cheap, exact, the
CPU default), `QwenVAECodec` packs `AutoencoderKLQwenImage` latents as the real pipelines do.

Legend: B samples, C channels, H×W pixels, h×w token grid, T = h·w tokens, P = C·p² token channels.
"""

from __future__ import annotations

import torch
from torch import nn

from tagmoe_lit.backbone.local import component_dir


def pack(x_BCHW: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/p)(W/p), C·p²], row-major over the token grid (diffusers' `_pack_latents`)."""
    B, C, H, W = x_BCHW.shape
    x = x_BCHW.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpack(x_BTP: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of `pack` for an h×w token grid."""
    B, _, P = x_BTP.shape
    C = P // (p * p)
    x = x_BTP.view(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, h * p, w * p)


class PixelCodec(nn.Module):
    """Pixels in [0, 1] scaled to [-1, 1] and packed p×p: no autoencoder, exact round trip."""

    def __init__(self, patch: int = 2):
        """
        Args:
            patch: side p of the pixel patch one token carries (tokens per image = H·W / p²).
        """
        super().__init__()
        self.patch = patch
        self.channels = 3
        self.downsample = patch  # pixels per token side

    @property
    def token_channels(self) -> int:
        return self.channels * self.patch**2

    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        return pack(images_B3HW * 2.0 - 1.0, self.patch)

    def decode(self, tokens_BTP: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return (unpack(tokens_BTP, h, w, self.patch) + 1.0) / 2.0


class QwenVAECodec(nn.Module):
    """`AutoencoderKLQwenImage` latents (distribution mode, normalized by the VAE's latents_mean/std), packed 2×2.

    The VAE is frozen. Load it from a local diffusers directory (`pretrained_path`: a Qwen-Image
    root folder, whose `vae/` is used, or that `vae/` folder itself; never downloaded) or build it
    from a `config` dict (tests).
    """

    def __init__(self, pretrained_path: str | None = None, config: dict | None = None, patch: int = 2):
        """
        Args:
            pretrained_path: local Qwen-Image root folder or its `vae/` folder (config.json + weights).
            config: `AutoencoderKLQwenImage` constructor arguments, for a randomly initialised VAE.
            patch: latent patch side packed into one token (Qwen-Image: 2).
        """
        super().__init__()
        from diffusers import AutoencoderKLQwenImage

        if (pretrained_path is None) == (config is None):
            raise ValueError("QwenVAECodec needs exactly one of `pretrained_path` (a local folder) or `config`.")
        if pretrained_path is not None:
            folder = component_dir(pretrained_path, "vae", "QwenVAECodec")
            self.vae = AutoencoderKLQwenImage.from_pretrained(folder, local_files_only=True)
        else:
            self.vae = AutoencoderKLQwenImage(**config)
        self.vae.requires_grad_(False).eval()
        cfg = self.vae.config
        self.patch, self.channels = patch, cfg.z_dim
        self.downsample = patch * self.vae.spatial_compression_ratio  # pixels per token side
        self.register_buffer("mean", torch.tensor(cfg.latents_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std).view(1, -1, 1, 1), persistent=False)

    @property
    def token_channels(self) -> int:
        return self.channels * self.patch**2

    def train(self, mode: bool = True) -> "QwenVAECodec":
        return super().train(False)  # frozen: never leave eval mode

    @torch.no_grad()
    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(images_B3HW[:, :, None] * 2.0 - 1.0).latent_dist.mode()[:, :, 0]
        return pack((z - self.mean) / self.std, self.patch)

    @torch.no_grad()
    def decode(self, tokens_BTP: torch.Tensor, h: int, w: int) -> torch.Tensor:
        z = unpack(tokens_BTP, h, w, self.patch) * self.std + self.mean
        return ((self.vae.decode(z[:, :, None]).sample[:, :, 0] + 1.0) / 2.0).clamp(0, 1)
