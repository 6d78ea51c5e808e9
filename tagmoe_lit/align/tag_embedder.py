"""Tag embedders: a sample's task tags → its semantic vector s.

The paper sums one learned embedding per tag (`nn.Embedding(18, 512)` in the release). Input is a
multi-hot float vector over the schema's ids so a sample may carry any number of tags, and the
sum is a single matmul. An embedder exposes `dim` so the prediction head can be sized to match.
"""

from __future__ import annotations

import torch
from torch import nn


class SumTagEmbedder(nn.Module):
    """s = Σ_{tags of the sample} E[tag]."""

    def __init__(self, num_tags: int, dim: int = 512, init_std: float = 1.0):
        """
        Args:
            num_tags: vocabulary size of the tag schema (ids 0..num_tags-1).
            dim: size of the semantic vector s (the release uses 512).
            init_std: std of the normal init of the table (nn.Embedding's default 1.0).
        """
        super().__init__()
        self.dim, self.init_std = dim, init_std
        self.table = nn.Embedding(num_tags, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.table.weight, std=self.init_std)

    def forward(self, tags_BV: torch.Tensor) -> torch.Tensor:
        """tags_BV: float multi-hot [B, num_tags] → s_BD [B, dim]."""
        return tags_BV.to(self.table.weight.dtype) @ self.table.weight
