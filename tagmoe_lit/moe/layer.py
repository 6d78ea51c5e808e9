"""The TAG-MoE layer: a dropless top-k mixture of GELU MLPs replacing an image-stream FFN.

Legend: B samples, T tokens per sample, N = B·T tokens, K top-k, M = N·K assignments,
D model dim, E experts.

Stages of `MoELayer.forward`:
  1. route    — router logits in fp32 (autocast off), softmax over all E experts, top-k choice.
  2. sort     — stable argsort of the M assignments by expert id; per-expert counts.
  3. experts  — each expert runs on its contiguous slice (`StackedExperts`); no capacity, no drops.
  4. combine  — scale by the router probability in fp32, `index_copy` back to token order into a
                preallocated buffer (deterministic, DESIGN.md pitfall 6), sum over the K choices.
  5. publish  — a `LayerRouting` record over the masked tokens (see `stats.py`).

Top-1 output is scaled by the *raw* top-1 probability, as the official release (MegaBlocks dMoE)
does; renormalizing it to 1 would cut the router off from the task loss (DESIGN.md pitfall 3).
For k > 1, `renormalize=True` makes the k weights sum to 1.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tagmoe_lit.moe.experts import Dispatch, StackedExperts
from tagmoe_lit.moe.routers import LinearRouter
from tagmoe_lit.moe.stats import LayerRouting

RouterFactory = Callable[[int, int], nn.Module]


class MoELayer(nn.Module):
    """Drop-in replacement for a `[B, T, D] → [B, T, D]` FFN.

    `token_mask` (bool [B, T], set by the backbone before its forward) selects the tokens that count
    for routing statistics, the balance loss and the signature; every token is still routed.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int = 4,
        top_k: int = 1,
        router: RouterFactory = LinearRouter,
        dispatch: Dispatch = "sorted",
        expert_bias: bool = True,
        renormalize: bool = False,
        debug_round_robin: bool = False,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}.")
        if dispatch not in ("sorted", "loop"):
            raise ValueError(f"dispatch='{dispatch}' is unknown; choose 'sorted' or 'loop'.")
        self.num_experts, self.top_k = num_experts, top_k
        self.dispatch, self.renormalize = dispatch, renormalize
        self.debug_round_robin = debug_round_robin  # rules routing out while hunting a bug
        self.router = router(dim, num_experts)
        self.experts = StackedExperts(num_experts, dim, hidden, bias=expert_bias)
        self.token_mask: torch.Tensor | None = None
        self.last: LayerRouting | None = None

    # -- 1. route ---------------------------------------------------------------------------
    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns probs_NE (fp32), scores_NK (fp32) and expert ids idx_NK."""
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            logits_NE = self.router(x_ND.float()).float()
        probs_NE = logits_NE.softmax(dim=-1)
        if self.debug_round_robin:
            n = torch.arange(x_ND.shape[0], device=x_ND.device)
            idx_NK = (n[:, None] + torch.arange(self.top_k, device=x_ND.device)) % self.num_experts
            scores_NK = probs_NE.gather(1, idx_NK)
        else:
            scores_NK, idx_NK = probs_NE.topk(self.top_k, dim=-1)
        if self.renormalize and self.top_k > 1:
            scores_NK = scores_NK / scores_NK.sum(-1, keepdim=True)
        return probs_NE, scores_NK, idx_NK

    # -- 2-4. sort, experts, combine ----------------------------------------------------------
    def _mix_sorted(self, x_ND: torch.Tensor, scores_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        N, D = x_ND.shape
        idx_M = idx_NK.reshape(-1)
        order_M = torch.argsort(idx_M, stable=True)  # assignment positions grouped by expert
        counts_E = torch.bincount(idx_M, minlength=self.num_experts).tolist()
        x_MD = x_ND[order_M // self.top_k]
        y_MD = self.experts.forward_sorted(x_MD, counts_E)
        y_MD = (y_MD.float() * scores_NK.reshape(-1)[order_M, None]).to(x_ND.dtype)
        out_MD = y_MD.new_empty(N * self.top_k, D).index_copy(0, order_M, y_MD)
        return out_MD.view(N, self.top_k, D).sum(1)

    def _mix_loop(self, x_ND: torch.Tensor, scores_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        """The plain per-expert loop: slow, obviously right; the test oracle."""
        out_ND = torch.zeros_like(x_ND)
        for e in range(self.num_experts):
            tok, k = torch.where(idx_NK == e)
            y = self.experts.expert(e, x_ND[tok]).float() * scores_NK[tok, k, None]
            out_ND = out_ND.index_add(0, tok, y.to(x_ND.dtype))
        return out_ND

    # -- 5. publish ---------------------------------------------------------------------------
    def _publish(self, probs_BTE: torch.Tensor, idx_BTK: torch.Tensor) -> None:
        B, T, E = probs_BTE.shape
        mask_BT = self.token_mask if self.token_mask is not None else probs_BTE.new_ones(B, T, dtype=torch.bool)
        if mask_BT.shape != (B, T):
            raise ValueError(f"token_mask has shape {tuple(mask_BT.shape)} but the layer input is [B={B}, T={T}].")
        w_BT = mask_BT.to(probs_BTE.dtype)
        n_B = w_BT.sum(1).clamp_min(1.0)
        signature_BE = (probs_BTE * w_BT[..., None]).sum(1) / n_B[:, None]
        with torch.no_grad():
            onehot_BTKE = F.one_hot(idx_BTK, E).to(probs_BTE.dtype) * w_BT[..., None, None]
            top1_counts_BE = onehot_BTKE[:, :, 0].sum(1)
            counts_E = onehot_BTKE.sum((0, 1, 2))
            ent_BT = -(probs_BTE * probs_BTE.clamp_min(1e-12).log()).sum(-1)
            entropy = (ent_BT * w_BT).sum() / w_BT.sum().clamp_min(1.0)
        probs_mean_E = (signature_BE * n_B[:, None]).sum(0) / n_B.sum()
        self.last = LayerRouting(probs_mean_E, counts_E, signature_BE, top1_counts_BE, entropy)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        probs_NE, scores_NK, idx_NK = self.route(x_ND)
        mix = self._mix_sorted if self.dispatch == "sorted" else self._mix_loop
        out_ND = mix(x_ND, scores_NK, idx_NK)
        self._publish(probs_NE.view(B, T, -1), idx_NK.view(B, T, -1))
        return out_ND.view(B, T, D)
