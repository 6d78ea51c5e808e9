"""Aspect-ratio buckets: image sizes a batch may have, and fitting an image into one.

The backbone builds RoPE for a whole batch from one image layout (DESIGN.md pitfall 10), so every
sample of a batch must have the same size. Real data comes in many aspect ratios; squashing them
all into one square distorts or wastes them. Buckets are the usual answer (SDXL, Qwen-Image
training): for every height that is a multiple of `multiple` (16: Qwen-Image's VAE ×8 and its 2×2
packing), the widest width, also a multiple, that keeps the area within `max_area`, as long as the
aspect ratio stays within `max_aspect`; plus the transpose of each, so that a portrait image gets
exactly the shape a landscape one does, turned (rounding down to multiples alone is not
symmetric: 512² px gives 688×368 but no 368×688). An image goes to the bucket nearest its aspect ratio (in
log ratio) and is resized to cover the bucket, then center-cropped: nothing is stretched, at most
the overhanging margin of the longer side is cut.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as TF


def aspect_buckets(max_area: int, multiple: int = 16, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) buckets, sides multiples of `multiple`, area ≤ max_area, ratio within max_aspect, closed under
    transposition; sorted."""
    if multiple < 1 or max_area < multiple * multiple:
        raise ValueError(f"max_area {max_area} must be at least multiple² = {multiple * multiple} (one {multiple}×{multiple} bucket).")
    if max_aspect < 1:
        raise ValueError(f"max_aspect {max_aspect} must be >= 1 (the longer side over the shorter one).")
    buckets = set()
    for h in range(multiple, max_area // multiple + 1, multiple):
        w = max_area // h // multiple * multiple
        if w >= multiple and max(h / w, w / h) <= max_aspect:
            buckets |= {(h, w), (w, h)}
    return sorted(buckets)


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (log-ratio distance; ties go to the larger area)."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def fit_to_bucket(image: torch.Tensor, size: tuple[int, int], nearest: bool = False) -> torch.Tensor:
    """[C, H, W] → [C, *size]: resize to cover `size` keeping the aspect ratio, then center-crop.

    Bilinear with antialiasing for images; `nearest` for masks. An image already of `size` is returned as is.
    """
    H, W = image.shape[-2:]
    if (H, W) == tuple(size):
        return image
    scale = max(size[0] / H, size[1] / W)
    covered = [max(size[0], round(H * scale)), max(size[1], round(W * scale))]
    mode = TF.InterpolationMode.NEAREST if nearest else TF.InterpolationMode.BILINEAR
    image = TF.resize(image, covered, interpolation=mode, antialias=not nearest)
    return TF.center_crop(image, list(size))
