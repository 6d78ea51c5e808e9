"""Reading images for training: decode with torchvision, fit into a bucket, scale to [0, 1].

Kept apart from the manifest logic so the prompt lists of `predict` read images the same way.
`probe_size` reads only the file header (Pillow, lazily), so a data module can bucket a million
rows at start-up without decoding them; `decode_image` then decodes with `torchvision.io`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from tagmoe_lit.data.buckets import fit_to_bucket


class ImageReadError(ValueError):
    """An image file is missing or cannot be decoded."""


def probe_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header; raises ImageReadError when it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, UnidentifiedImageError) as err:
        raise ImageReadError(f"cannot be read as an image ({type(err).__name__}: {err})") from None
    return height, width


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """float [3, *size] in [0, 1]: decoded as RGB (gray and alpha converted), fitted to `size`."""
    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError) as err:
        raise ImageReadError(f"cannot be decoded ({err})") from None
    scale = 65535.0 if image.dtype == torch.uint16 else 255.0  # 16-bit PNGs decode as uint16
    return fit_to_bucket(image, size).float() / scale


def load_mask(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """bool [*size]: True where the image is bright (> half scale), fitted with nearest-neighbour."""
    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.GRAY)
    except (RuntimeError, OSError) as err:
        raise ImageReadError(f"cannot be decoded ({err})") from None
    half = 32767 if image.dtype == torch.uint16 else 127
    return fit_to_bucket(image, size, nearest=True)[0] > half
