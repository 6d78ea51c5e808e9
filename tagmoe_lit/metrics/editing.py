"""Per-sample editing metrics against SynthTAG's exact targets: accuracy, success, PSNR, SSIM, confusion.

Images are float [B, 3, H, W] in [0, 1]; every metric is a tensor [B], NaN where its region is empty.

- A pixel is *correct* when its largest absolute channel error against the target is <= `pixel_tol`
  (0.1). SynthTAG's palette colours are >= 0.35 apart in some channel (>= 0.18 after darkening or
  brightening) and every pixel a task changes moves by >= 0.28, so 0.1 accepts the right colour
  with some noise and rejects a wrong colour or an unchanged pixel.
- The *edited region* is the mask's pixels where the target differs from the source by more than
  `pixel_tol` (every pixel when there is no source). So a copy of the source scores exactly 0 there,
  and mask pixels the edit leaves unchanged count in neither region. The *preserved region* is the
  pixels outside the mask; it is empty (NaN) for global edits, customization and generation.
- `edit_accuracy` / `preserve_accuracy`: fraction of correct pixels in each region.
- `success` (0/1): edit_accuracy >= `edit_threshold` (0.8) and, unless the preserved region is
  empty, preserve_accuracy >= `preserve_threshold` (0.95). Preservation is stricter because
  unrequested changes should be rare, while the edited region may have soft edges. NaN when the
  edited region is empty (nothing to judge).
- `psnr_*`: 10 log10(1 / MSE) over region pixels x channels (data range 1), capped at `PSNR_CAP`
  = 100 dB (MSE <= 1e-10) so that an exact match is finite and averages.
- `ssim_*`: torchmetrics' SSIM map averaged inside the region. The window is uniform (torchmetrics
  ignores `kernel_size` for Gaussian windows and sizes them from sigma, 11 px at sigma 1.5, too wide
  for 32 px images with 6 px objects): 3 px below 64 px images, else 7 px (scikit-image's default).
  The inputs are reflection-padded, so the map is H x W and aligned with the image; pixels at a
  region's border see up to `kernel // 2` pixels of the other region.
- *Confusion*: the output misses its own target but realizes another candidate (whole-image
  accuracy >= `edit_threshold` for both tests). SynthTAG cannot render another task's edit of the
  same scene, so candidates are the source-determined global edits of `source_alternatives`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

PSNR_CAP = 100.0


@dataclass(frozen=True)
class EditThresholds:
    """Tolerances of the success test; defaults suit SynthTAG's saturated palette (see module docstring)."""

    pixel_tol: float = 0.1
    """Largest absolute channel error of a correct pixel, on the [0, 1] scale."""
    edit_threshold: float = 0.8
    """Least fraction of correct pixels in the edited region (and for confusion, in the whole image)."""
    preserve_threshold: float = 0.95
    """Least fraction of correct pixels outside the mask."""


def correct_pixels(generated_B3HW: torch.Tensor, target_B3HW: torch.Tensor, pixel_tol: float = 0.1) -> torch.Tensor:
    """Bool [B, H, W]: the largest channel error is within `pixel_tol`."""
    return (generated_B3HW - target_B3HW).abs().amax(1) <= pixel_tol


def region_mean(values_BHW: torch.Tensor, region_BHW: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over each sample's region; NaN where the region is empty."""
    region = region_BHW.to(values_BHW.dtype)
    return (values_BHW * region).sum((1, 2)) / region.sum((1, 2))  # 0 / 0 = NaN


def psnr(generated_B3HW: torch.Tensor, target_B3HW: torch.Tensor, region_BHW: torch.Tensor) -> torch.Tensor:
    """PSNR (dB, data range 1) of the region, capped at `PSNR_CAP`; NaN where empty."""
    mse_B = region_mean((generated_B3HW - target_B3HW).square().mean(1), region_BHW)
    return -10 * mse_B.clamp_min(10 ** (-PSNR_CAP / 10)).log10()  # NaN passes through clamp


def ssim_map(generated_B3HW: torch.Tensor, target_B3HW: torch.Tensor, kernel: int | None = None) -> torch.Tensor:
    """Channel-mean SSIM map [B, H, W], uniform `kernel` window (default 3 below 64 px, else 7)."""
    if kernel is None:
        kernel = 3 if min(target_B3HW.shape[-2:]) < 64 else 7
    _, map_B3HW = structural_similarity_index_measure(
        generated_B3HW, target_B3HW, gaussian_kernel=False, kernel_size=kernel,
        data_range=1.0, reduction="none", return_full_image=True,
    )
    return map_B3HW.mean(1)


def edit_metrics(
    generated_B3HW: torch.Tensor,
    target_B3HW: torch.Tensor,
    source_B3HW: torch.Tensor,
    mask_BHW: torch.Tensor,
    has_source_B: torch.Tensor,
    thresholds: EditThresholds = EditThresholds(),
    ssim_kernel: int | None = None,
) -> dict[str, torch.Tensor]:
    """All region metrics of the module docstring, each [B]; `source` is ignored where `has_source` is False."""
    generated, target, source = generated_B3HW.float(), target_B3HW.float(), source_B3HW.float()
    changed_BHW = (target - source).abs().amax(1) > thresholds.pixel_tol
    edited_BHW = mask_BHW & (changed_BHW | ~has_source_B.view(-1, 1, 1))
    preserved_BHW = ~mask_BHW
    correct_BHW = correct_pixels(generated, target, thresholds.pixel_tol).float()
    edit_acc_B = region_mean(correct_BHW, edited_BHW)
    preserve_acc_B = region_mean(correct_BHW, preserved_BHW)
    preserved_ok_B = preserve_acc_B.isnan() | (preserve_acc_B >= thresholds.preserve_threshold)
    success_B = ((edit_acc_B >= thresholds.edit_threshold) & preserved_ok_B).float()
    ssim_BHW = ssim_map(generated, target, ssim_kernel)
    return {
        "edit_accuracy": edit_acc_B,
        "preserve_accuracy": preserve_acc_B,
        "success": success_B.masked_fill(edit_acc_B.isnan(), float("nan")),
        "psnr_edit": psnr(generated, target, edited_BHW),
        "psnr_preserved": psnr(generated, target, preserved_BHW),
        "ssim_edit": region_mean(ssim_BHW, edited_BHW),
        "ssim_preserved": region_mean(ssim_BHW, preserved_BHW),
    }


def source_alternatives(source_B3HW: torch.Tensor) -> dict[str, torch.Tensor]:
    """SynthTAG's stylize and relight targets for `source`, computed on uint8 exactly as `synthtag.py` does."""
    s = (source_B3HW.float() * 255).round().clamp(0, 255).to(torch.int32)
    gray_B1HW = (77 * s[:, :1] + 150 * s[:, 1:2] + 29 * s[:, 2:]) >> 8  # weights sum to 256
    alternatives = {
        "stylize/invert": 255 - s,
        "stylize/grayscale": gray_B1HW.expand_as(s),
        "relight/darker": s // 2,
        "relight/brighter": s + (255 - s) // 2,
    }
    return {name: image.float() / 255 for name, image in alternatives.items()}


def confusion(
    generated_B3HW: torch.Tensor,
    target_B3HW: torch.Tensor,
    candidates_KB3HW: torch.Tensor,
    thresholds: EditThresholds = EditThresholds(),
) -> torch.Tensor:
    """Long [B]: index of the candidate the output realizes while missing its own target, else -1.

    Among several matching candidates the most accurate wins. Only meaningful for samples with a
    source, since `source_alternatives` of a zero source are plain black / gray / white images.
    """
    K = candidates_KB3HW.shape[0]
    generated = generated_B3HW.float()
    flat = candidates_KB3HW.float().flatten(0, 1)  # (K * B, 3, H, W)
    correct_KBHW = correct_pixels(generated.repeat(K, 1, 1, 1), flat, thresholds.pixel_tol).unflatten(0, (K, -1))
    accuracy_KB = correct_KBHW.float().mean((2, 3))
    own_accuracy_B = correct_pixels(generated, target_B3HW.float(), thresholds.pixel_tol).float().mean((1, 2))
    best_acc_B, best_B = accuracy_KB.max(0)
    confused_B = (best_acc_B >= thresholds.edit_threshold) & (own_accuracy_B < thresholds.edit_threshold)
    return torch.where(confused_B, best_B, -1)

