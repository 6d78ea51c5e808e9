"""L_align = 1 − cos(H(g), s), and the two baselines that say whether it means anything.

The alignment loss can be gamed: the tag table and the head can find a shared direction that
lowers it for any signature (DESIGN.md §3). So the same loss is also computed with the batch's
signatures shifted by one sample (each sample scored against another sample's routing) and with
the batch-mean signature for everyone. Only the gap between the true loss and these baselines
shows that routing carries task intent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def alignment_loss(pred_BD: torch.Tensor, s_BD: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 − cos(H(g), s): [B]; the caller takes the mean."""
    return 1.0 - F.cosine_similarity(pred_BD.float(), s_BD.float(), dim=-1)


@torch.no_grad()
def alignment_baselines(
    head: nn.Module, g_BE: torch.Tensor, s_BD: torch.Tensor, keep_B: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Alignment loss with shuffled (rolled) and with constant (batch-mean) signatures, weighted by
    `keep_B` as the true loss is (default: every sample)."""
    keep_B = torch.ones_like(s_BD[:, 0], dtype=torch.float32) if keep_B is None else keep_B
    shuffled = (alignment_loss(head(g_BE.roll(1, dims=0)), s_BD) * keep_B).mean()
    constant = (alignment_loss(head(g_BE.mean(0, keepdim=True).expand_as(g_BE)), s_BD) * keep_B).mean()
    return {"align_shuffled": shuffled, "align_constant": constant}
