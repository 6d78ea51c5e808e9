"""Experts stored as stacked 3-D weights, and the dispatch backends that run them.

Legend: N tokens, K top-k, M = N·K token-expert assignments, D model dim, H expert hidden, E experts.

Backends (all drop no token and give the same answer, tested against the loop):
  loop     per-expert boolean selection; slow and obviously right — the test oracle (in layer.py).
  sorted   tokens sorted by expert, split into contiguous slices, one matmul pair per expert.
  grouped  the same sorted tokens through `torch._grouped_mm` with cumulative offsets: one kernel
           for all experts (no per-expert launch, no host sync for split sizes); runs on CPU too.
  auto     grouped on CUDA in bf16/fp16 (its CUDA kernel takes no fp32), sorted elsewhere.

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
from torch.distributed.tensor import DTensor

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
        self.lora: nn.Module | None = None  # a low-rank adapter per expert, attached by `lora.apply_lora`
        self.reset_parameters()

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1 [E, D, H], w2 [E, H, D]) as every backend uses them: with a LoRA adapter attached,
        the frozen weights plus its low-rank update (`lora.ExpertLoRA.merged`). Under expert
        parallelism these are this rank's experts only (`distributed/expert_parallel.py`)."""
        w1, w2 = _local(self.w1_EDH), _local(self.w2_EHD)
        return (w1, w2) if self.lora is None else self.lora.merged(w1, w2)

    def biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(b1 [E, H], b2 [E, D]), None without biases; this rank's experts only under expert parallelism."""
        return _local(self.b1_EH), _local(self.b2_ED)

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert (used when not upcycling)."""
        for w, fan_in in ((self.w1_EDH, self.dim), (self.w2_EHD, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
        for b, fan_in in ((self.b1_EH, self.dim), (self.b2_ED, self.hidden)):
            if b is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(b, -bound, bound)

    def _per_expert(self) -> list[tuple[torch.Tensor, ...]]:
        """(w1, b1, w2, b2) views of every expert. `unbind` once: indexing `w[e]` per expert would
        make autograd build a zero-filled full-size [E, …] gradient for every slice."""
        w1, w2 = self.weights()
        b1, b2 = self.biases()
        none = [None] * w1.shape[0]
        return list(zip(w1.unbind(0), none if b1 is None else b1.unbind(0), w2.unbind(0), none if b2 is None else b2.unbind(0)))

    @staticmethod
    def _mlp(x_MD: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
        """GELU(tanh) MLP on one expert's tokens (M may be 0: the weights still join the graph)."""
        h_MH = torch.addmm(b1, x_MD, w1) if b1 is not None else x_MD @ w1
        h_MH = F.gelu(h_MH, approximate="tanh")
        return torch.addmm(b2, h_MH, w2) if b2 is not None else h_MH @ w2

    def expert(self, e: int, x_MD: torch.Tensor) -> torch.Tensor:
        """Run expert `e` alone (the loop oracle's path)."""
        return self._mlp(x_MD, *self._per_expert()[e])

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor, grouped: bool = False) -> torch.Tensor:
        """Tokens already sorted by expert, `counts_E` rows per expert: the sorted or the grouped
        backend. The one entry point, so that expert parallelism's hooks see every call."""
        return self.forward_grouped(x_MD, counts_E) if grouped else self.forward_sorted(x_MD, counts_E)

    def forward_sorted(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Tokens already sorted by expert: one matmul pair per contiguous expert slice.

        A hand-written autograd function writes every slice's output and every expert's weight
        gradient straight into preallocated buffers: autograd's own graph would `cat` the outputs
        and `stack` the E weight gradients, copies that cost ~9 % of the layer at 1024 tokens.
        """
        w1, w2 = self.weights()
        b1, b2 = self.biases()
        b1 = b1 if b1 is not None else w1.new_zeros(0)
        b2 = b2 if b2 is not None else w2.new_zeros(0)
        dtype = compute_dtype(x_MD)  # its matmuls write into buffers (`out=`), which autocast does not cast
        return _SortedExperts.apply(x_MD.to(dtype), counts_E.tolist(), *(t.to(dtype) for t in (w1, b1, w2, b2)))

    def forward_grouped(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Tokens already sorted by expert: two grouped GEMMs over all experts at once.

        `torch._grouped_mm` needs row strides that are multiples of 16 bytes (dim and hidden
        multiples of 4 in fp32, 8 in bf16) and int32 offsets. It is on no autocast list, and under
        CUDA autocast the tokens reaching the FFN are fp32 (they come out of a norm), while its CUDA
        kernel takes bf16 (found under fake CUDA tensors, docs/plan_spike.md): so inside autocast
        the tokens and weights are cast to the autocast dtype here, as autocast would for a matmul.
        """
        offs_E = counts_E.cumsum(0).to(torch.int32)
        dtype = compute_dtype(x_MD)
        x_MD = x_MD.to(dtype)
        w1, w2 = (w.to(dtype) for w in self.weights())
        b1, b2 = self.biases()
        h_MH = torch._grouped_mm(x_MD.contiguous(), w1, offs=offs_E)
        if b1 is not None:
            h_MH = h_MH + b1.to(h_MH.dtype).repeat_interleave(counts_E, dim=0, output_size=x_MD.shape[0])
        y_MD = torch._grouped_mm(F.gelu(h_MH, approximate="tanh").contiguous(), w2, offs=offs_E)
        if b2 is not None:
            y_MD = y_MD + b2.to(y_MD.dtype).repeat_interleave(counts_E, dim=0, output_size=x_MD.shape[0])
        return y_MD


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` would run in here: autocast's, inside an autocast region."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter's local tensor: expert parallelism makes the expert weights DTensors split over
    experts (this rank computes with its own); elsewhere the parameter itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class _SortedExperts(torch.autograd.Function):
    """y[r_e] = GELU(x[r_e]·W1[e] + b1[e])·W2[e] + b2[e] over contiguous row ranges r_e.

    Empty bias tensors (numel 0) mean "no bias". Saves x and the pre-activation, like autograd would.
    """

    @staticmethod
    def forward(ctx, x_MD, counts, w1_EDH, b1_EH, w2_EHD, b2_ED):
        M, H = x_MD.shape[0], w1_EDH.shape[2]
        h_MH, y_MD = x_MD.new_empty(M, H), x_MD.new_empty(M, w2_EHD.shape[2])
        g_MH = torch.empty_like(h_MH)
        start = 0
        for e, m in enumerate(counts):
            r = slice(start, start + m)
            start += m
            if b1_EH.numel():
                torch.addmm(b1_EH[e], x_MD[r], w1_EDH[e], out=h_MH[r])
            else:
                torch.mm(x_MD[r], w1_EDH[e], out=h_MH[r])
            torch.ops.aten.gelu.out(h_MH[r], approximate="tanh", out=g_MH[r])
            if b2_ED.numel():
                torch.addmm(b2_ED[e], g_MH[r], w2_EHD[e], out=y_MD[r])
            else:
                torch.mm(g_MH[r], w2_EHD[e], out=y_MD[r])
        ctx.counts = counts
        ctx.save_for_backward(x_MD, h_MH, g_MH, w1_EDH, b1_EH, w2_EHD, b2_ED)
        return y_MD

    @staticmethod
    def backward(ctx, dy_MD):
        x_MD, h_MH, g_MH, w1_EDH, b1_EH, w2_EHD, b2_ED = ctx.saved_tensors
        need_x, _, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        need_b1, need_b2 = need_b1 and b1_EH.numel() > 0, need_b2 and b2_ED.numel() > 0
        dy_MD = dy_MD.contiguous()
        # only the gradients autograd asks for (frozen experts, or a leaf input, skip GEMMs)
        dx_MD = torch.empty_like(x_MD) if need_x else None
        dw1 = torch.empty_like(w1_EDH) if need_w1 else None
        dw2 = torch.empty_like(w2_EHD) if need_w2 else None
        db1 = torch.empty_like(b1_EH) if need_b1 else None
        db2 = torch.empty_like(b2_ED) if need_b2 else None
        start = 0
        for e, m in enumerate(ctx.counts):
            r = slice(start, start + m)
            start += m
            dy = dy_MD[r]
            if need_w2:
                torch.mm(g_MH[r].t(), dy, out=dw2[e])
            if need_b2:
                torch.sum(dy, 0, out=db2[e])
            if not (need_x or need_w1 or need_b1):
                continue
            dh = torch.ops.aten.gelu_backward(dy @ w2_EHD[e].t(), h_MH[r], approximate="tanh")
            if need_w1:
                torch.mm(x_MD[r].t(), dh, out=dw1[e])
            if need_x:
                torch.mm(dh, w1_EDH[e].t(), out=dx_MD[r])
            if need_b1:
                torch.sum(dh, 0, out=db1[e])
        return dx_MD, None, dw1, db1, dw2, db2
