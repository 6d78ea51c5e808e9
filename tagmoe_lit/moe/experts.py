"""Experts stored as stacked 3-D weights, and the dispatch backends that run them.

Legend: N tokens, K top-k, M = N·K token-expert assignments, D model dim, H expert hidden, E experts.

Backends (all drop no token and give the same answer, tested against the loop):
  loop     per-expert boolean selection; slow and obviously right — the test oracle (in layer.py).
  sorted   tokens sorted by expert, split into contiguous slices, one matmul pair per expert.
  grouped  the same sorted tokens through `torch._grouped_mm` with cumulative offsets: one kernel
           for all experts (no per-expert launch, no host sync for split sizes); runs on CPU too.
  auto     grouped on CUDA, sorted elsewhere.

Every expert's weights are slices of one parameter per matrix, so every expert takes part in
forward and backward on every step even with zero tokens (an idle expert's slice gets a zero
gradient): DDP never sees an unused parameter and FSDP shards whole tensors (DESIGN.md pitfall 2).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Dispatch = Literal["auto", "sorted", "grouped", "loop"]


class StackedExperts(nn.Module):
    """E independent GELU(tanh) MLPs D → H → D, weights stacked along a leading expert axis."""

    def __init__(self, num_experts: int, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.w1_EDH = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2_EHD = nn.Parameter(torch.empty(num_experts, hidden, dim))
        # The official release's experts have no bias; upcycling a diffusers FFN (which has biases)
        # keeps them so the upcycled layer computes exactly the dense FFN at init.
        self.b1_EH = nn.Parameter(torch.empty(num_experts, hidden)) if bias else None
        self.b2_ED = nn.Parameter(torch.empty(num_experts, dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert (used when not upcycling)."""
        for w, fan_in in ((self.w1_EDH, self.dim), (self.w2_EHD, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
        for b, fan_in in ((self.b1_EH, self.dim), (self.b2_ED, self.hidden)):
            if b is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(b, -bound, bound)

    def expert(self, e: int, x_MD: torch.Tensor) -> torch.Tensor:
        """Run expert `e` on its tokens (M may be 0: the slice still joins the autograd graph)."""
        h_MH = x_MD @ self.w1_EDH[e]
        if self.b1_EH is not None:
            h_MH = h_MH + self.b1_EH[e]
        y_MD = F.gelu(h_MH, approximate="tanh") @ self.w2_EHD[e]
        if self.b2_ED is not None:
            y_MD = y_MD + self.b2_ED[e]
        return y_MD

    def forward_sorted(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Tokens already sorted by expert: split into E contiguous groups, one matmul pair each."""
        return torch.cat([self.expert(e, x) for e, x in enumerate(x_MD.split(counts_E.tolist()))])

    def forward_grouped(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Tokens already sorted by expert: two grouped GEMMs over all experts at once.

        `torch._grouped_mm` needs row strides that are multiples of 16 bytes (dim and hidden
        multiples of 4 in fp32, 8 in bf16) and int32 offsets.
        """
        offs_E = counts_E.cumsum(0).to(torch.int32)
        w1, w2 = self.w1_EDH.to(x_MD.dtype), self.w2_EHD.to(x_MD.dtype)
        h_MH = torch._grouped_mm(x_MD.contiguous(), w1, offs=offs_E)
        if self.b1_EH is not None:
            h_MH = h_MH + self.b1_EH.to(h_MH.dtype).repeat_interleave(counts_E, dim=0, output_size=x_MD.shape[0])
        y_MD = torch._grouped_mm(F.gelu(h_MH, approximate="tanh").contiguous(), w2, offs=offs_E)
        if self.b2_ED is not None:
            y_MD = y_MD + self.b2_ED.to(y_MD.dtype).repeat_interleave(counts_E, dim=0, output_size=x_MD.shape[0])
        return y_MD
