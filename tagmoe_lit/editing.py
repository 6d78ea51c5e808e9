"""Editing one user image, as the TAG-MoE release's `infer.py` does: the reference, the noise, the loop.

- `reference_pixels`: the release's preprocessing. RGBA is composited on white (other modes are
  converted to RGB), and the image is resized with LANCZOS — stretched, not cropped — to the
  resolution whose aspect ratio w/h is nearest its own (linear distance; ties to the smaller width),
  from the release's list (`RELEASE_RESOLUTIONS`, ~1 MP, sides multiples of 64) or, for a small
  kit model, from the kit's aspect buckets (`kit_resolutions`).
- `starting_noise`: ε drawn as the release draws it (a CPU generator seeded with `seed`, latent
  shape [1, 1, C, 2h, 2w], packed 2×2): on CPU the same seed gives the release's noise.
- `edit`: reference tokens from the codec (the VAE's distribution *mode*, where the release draws
  `latent_dist.sample()` from the unseeded global RNG: the mode makes an edit reproducible from its
  seed), then the sampler (`QwenImageSampler` is the release's loop), then decoding. It also returns
  the routing signature g per MoE layer and, with an alignment head, the tag set whose embedding
  is nearest the head's prediction H(g): what the router takes the task to be.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tagmoe_lit.backbone.codecs import pack
from tagmoe_lit.data.buckets import aspect_buckets
from tagmoe_lit.generation import sample

if TYPE_CHECKING:
    from PIL import Image

    from tagmoe_lit.module import TagMoEModule
    from tagmoe_lit.sampling import FlowSampler

# (width, height): 1024² area class, sides multiples of 64 — w + h = 2048 from 512×1536 to 1536×512,
# plus the long thin 512 × 1600…2048 and their transposes (33 in all, the release's list)
RELEASE_RESOLUTIONS: list[tuple[int, int]] = sorted(
    {(w, 2048 - w) for w in range(512, 1537, 64)} | {(512, h) for h in range(1600, 2049, 64)} | {(h, 512) for h in range(1600, 2049, 64)}
)
MAX_PIXELS = 64 * 2**20  # larger uploads are refused before decoding (decompression bombs)
FORMATS = ("PNG", "JPEG", "WEBP")  # the decoders an input may reach: the common, well-fuzzed ones


class EditInputError(ValueError):
    """An input image or instruction that cannot be edited; the message says what to do."""


def kit_resolutions(image_size: int, multiple: int) -> list[tuple[int, int]]:
    """(width, height) aspect buckets of a kit model trained at image_size² pixels."""
    return [(w, h) for h, w in aspect_buckets(image_size * image_size, multiple)]


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A decoded PNG, JPEG or WebP, or an `EditInputError` naming the problem (missing, another
    format, not an image, too large)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise EditInputError(f"Image {path} does not exist; pass the path of a PNG, JPEG or WebP file.")
    try:
        with Image.open(path, formats=FORMATS) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise EditInputError(f"Image {path} has {width}×{height} pixels, more than the {max_pixels:,} allowed; downscale it first.")
            probe.load()
            return probe.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise EditInputError(f"Image {path} cannot be decoded ({err}); pass a PNG, JPEG or WebP file.") from None


def nearest_resolution(width: int, height: int, resolutions: list[tuple[int, int]]) -> tuple[int, int]:
    """The release's rule: the (w, h) minimizing |width/height − w/h|, ties to the smaller w."""
    return min((abs(width / height - w / h), w, h) for w, h in resolutions)[1:]


def reference_pixels(image: Image.Image, resolutions: list[tuple[int, int]]) -> torch.Tensor:
    """[3, H, W] in [0, 1]: RGBA on white, stretched (LANCZOS) to the nearest resolution."""
    import numpy as np
    from PIL import Image

    if image.mode == "RGBA":
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    image = image.convert("RGB")
    size = nearest_resolution(*image.size, resolutions)
    if image.size != size:
        image = image.resize(size, Image.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def to_pil(image_3HW: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] → an 8-bit RGB image."""
    from PIL import Image

    return Image.fromarray((image_3HW.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def starting_noise(seed: int, grid: tuple[int, int], channels: int, patch: int) -> torch.Tensor:
    """[1, h·w, C·p²]: the release's `randn_tensor` of the latent [1, 1, C, p·h, p·w] on a CPU generator, packed."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, 1, channels, patch * grid[0], patch * grid[1], generator=g)
    return pack(latent[:, 0], patch)


@dataclass
class Edit:
    image: torch.Tensor  # [3, H, W] in [0, 1]
    tokens: torch.Tensor  # [1, h·w, P]: the sampler's final latents
    signature_LE: torch.Tensor | None  # routing signature per MoE layer (None: dense model)
    predicted_tags: list[str] | None  # the tag set nearest H(g) (None without head and tag embedder)


@torch.no_grad()
def edit(model: TagMoEModule, pixels_3HW: torch.Tensor, instruction: str, sampler: FlowSampler,
         seed: int = 0, noise: torch.Tensor | None = None) -> Edit:
    """Edit one image (pixels from `reference_pixels`) by one instruction; `noise` overrides the seed's."""
    if not instruction.strip():
        raise EditInputError("The instruction is empty; say what to change, e.g. \"make the sky pink\".")
    if any(layer.router.needs_context for layer in model.moe_layers):
        raise EditInputError("This model's router reads the task tags (an oracle baseline), which an edit does not have; "
                             "edit with a TAG-MoE or task-agnostic checkpoint.")
    weight = model.backbone.transformer.img_in.weight  # the backbone may run in bf16 on a GPU, the codec in fp32
    source = pixels_3HW[None].to(weight.device)
    reference, grid = model.codec.encode(source).to(weight.dtype), model.grid(source)
    if noise is None:
        noise = starting_noise(seed, grid, model.codec.channels, model.codec.patch)
    tokens, signature_LE = sample(model, [instruction], reference, grid, noise.to(reference), None, sampler)
    image = model.codec.decode(tokens.float(), *grid).clamp(0, 1)[0]
    return Edit(image.cpu(), tokens.cpu(), None if signature_LE is None else signature_LE[:, 0].cpu(),
                predicted_tag_set(model, signature_LE[:, 0].mean(0)) if signature_LE is not None else None)


def predicted_tag_set(model: TagMoEModule, g_E: torch.Tensor) -> list[str] | None:
    """The tag set (at most one tag per level, at least one in all) whose embedding s has the highest
    cosine with the head's prediction H(g)."""
    if model.head is None or model.tag_embedder is None:
        return None
    schema = model.schema
    levels = [[None, *tags] for tags in schema.levels.values()]
    candidates = [[t for t in combo if t is not None] for combo in itertools.product(*levels)]
    candidates = [c for c in candidates if c]
    multi_hot = torch.stack([schema.multi_hot(schema.encode(c)) for c in candidates]).to(g_E.device)
    s_ND = model.tag_embedder(multi_hot)
    h_D = model.head(g_E[None].to(next(model.head.parameters()).dtype))[0]
    return candidates[int(F.cosine_similarity(s_ND, h_D[None].to(s_ND), dim=-1).argmax())]
