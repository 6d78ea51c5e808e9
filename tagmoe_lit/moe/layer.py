"""The TAG-MoE layer: a dropless top-k mixture of GELU MLPs replacing an image-stream FFN.

Legend: B samples, T tokens per sample, N = B·T tokens, K top-k, M = N·K assignments,
D model dim, C router context dim, E experts.

Stages of `MoELayer.forward`:
  1. route    — router logits in fp32 (autocast off), softmax over all E experts, top-k choice
                (on probabilities plus the router's selection bias, if it has one; the weights
                always come from the raw probabilities).
  2. sort     — stable argsort of the M assignments by expert id; per-expert counts.
  3. experts  — every expert on its contiguous slice (`StackedExperts`); no capacity, no drops.
  4. combine  — scale by the router probability in fp32, `index_copy` back to token order into a
                preallocated buffer (deterministic, DESIGN.md pitfall 6), sum over the K choices.
  5. publish  — a `LayerRouting` record over the masked tokens (see `stats.py`).

Top-1 output is scaled by the *raw* top-1 probability, as the official release (MegaBlocks dMoE)
does; renormalizing it to 1 would cut the router off from the task loss (DESIGN.md pitfall 3).
For k > 1, `renormalize=True` makes the k weights sum to 1.

The layer replaces a diffusers FFN called as `img_mlp(x)`, so two per-sample inputs reach it
through `set_routing_inputs` before the backbone's forward: `token_mask_BT` (the tokens that count
for statistics) and `context_BC` (features for routers with `needs_context`, e.g. the tag-conditioned
oracle). They stay set until the next call, so activation checkpointing's recompute sees them too.
Each forward's record is read back through `routing`; training counts go to `counts`
(`ExpertCounts`, which ignores checkpoint recomputes).
`knockout(experts)` removes experts for analysis: they are never selected, so their tokens go
to their next-best expert, weighted by that expert's own (unrenormalized) probability.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tagmoe_lit.metrics.entropy import entropy
from tagmoe_lit.moe.experts import Dispatch, StackedExperts
from tagmoe_lit.moe.expert_counts import BiasBalanced, ExpertCounts
from tagmoe_lit.moe.routers import LinearRouter
from tagmoe_lit.moe.stats import LayerRouting
from tagmoe_lit.moe.upcycle import reset_tied_

RouterFactory = Callable[[int, int], nn.Module]
ExpertInit = Literal["independent", "tied"]


class MoELayer(nn.Module):
    """Drop-in replacement for a `[B, T, D] → [B, T, D]` FFN."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int = 4,
        top_k: int = 1,
        router: RouterFactory = LinearRouter,
        dispatch: Dispatch = "auto",
        expert_bias: bool = False,
        renormalize: bool = False,
        expert_init: ExpertInit = "independent",
        debug_round_robin: bool = False,
    ):
        """
        Args:
            dim: token feature size D (given by the backbone).
            hidden: expert hidden size H (given by the backbone: the replaced FFN's).
            num_experts: number of experts E.
            top_k: experts per token K.
            router: router factory called as router(dim, num_experts).
            dispatch: expert backend: auto (grouped on CUDA in bf16/fp16, else sorted), sorted, grouped or loop.
            expert_bias: give experts biases (the release's have none; upcycling a biased FFN into
                bias-free experts drops its biases, as the release does; true keeps them exactly).
            renormalize: for top_k > 1, make the K weights sum to 1.
            expert_init: how experts start when no dense weights are loaded: `independent` draws
                (MegaBlocks draws the whole expert tensor; symmetric experts stay symmetric under
                top-1 routing for long), or `tied` copies of one fresh dense FFN (the kit's old
                start, kept for ablation). A pretrained dense start always upcycles.
            debug_round_robin: route token n to expert n mod E, ruling routing out while debugging.
        """
        super().__init__()
        problems = []
        if not 1 <= top_k <= num_experts:
            problems.append(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        if dispatch not in ("auto", "sorted", "grouped", "loop"):
            problems.append(f"dispatch='{dispatch}' is unknown; choose 'auto', 'sorted', 'grouped' or 'loop'")
        if expert_init not in ("independent", "tied"):
            problems.append(f"expert_init='{expert_init}' is unknown; choose 'independent' or 'tied'")
        if problems:
            raise ValueError("MoELayer: " + "; ".join(problems) + ".")
        self.num_experts, self.top_k = num_experts, top_k
        self.dispatch, self.renormalize, self.expert_init = dispatch, renormalize, expert_init
        self.debug_round_robin = debug_round_robin
        self.router = router(dim, num_experts)
        self.experts = StackedExperts(num_experts, dim, hidden, bias=expert_bias)
        self.counts = ExpertCounts(num_experts)  # assignments since the last optimizer step (all micro-batches)
        self._token_mask_BT: torch.Tensor | None = None
        self._context_BC: torch.Tensor | None = None
        self._routing: LayerRouting | None = None
        self.knocked_out: tuple[int, ...] = ()

    def set_routing_inputs(self, token_mask_BT: torch.Tensor | None = None, context_BC: torch.Tensor | None = None) -> None:
        """The tokens that count for statistics (bool [B, T]; None: all) and the per-sample router
        context ([B, C], used by routers with `needs_context`) of the next forwards."""
        self._token_mask_BT, self._context_BC = token_mask_BT, context_BC

    @property
    def routing(self) -> LayerRouting | None:
        """The record of the last forward (None before the first)."""
        return self._routing

    def reset_parameters(self) -> None:
        """The from-scratch init of `expert_init`, for materialization of a meta build (which runs
        this after the children's inits, so `independent` experts are already drawn by
        `StackedExperts.reset_parameters`, as in the constructor). `tied`: copies of one fresh dense
        FFN (`upcycle.reset_tied_`), as an eager build's surgery copies the FFN it replaces."""
        if self.expert_init == "tied":
            reset_tied_(self.experts)

    def knockout(self, experts: tuple[int, ...] | list[int] = ()) -> None:
        """Never select these experts (expert-knockout analysis); `()` restores the layer."""
        experts = tuple(sorted(set(experts)))
        if any(not 0 <= e < self.num_experts for e in experts) or self.num_experts - len(experts) < self.top_k:
            raise ValueError(
                f"Cannot knock out experts {list(experts)} of {self.num_experts} with top_k={self.top_k}: "
                f"name expert ids in 0..{self.num_experts - 1} and keep at least {self.top_k}."
            )
        self.knocked_out = experts

    def _apply(self, fn, recurse: bool = True):
        """Casting the model (`.bfloat16()`, bf16-true precision) leaves the router in fp32."""
        super()._apply(fn, recurse)
        for t in (*self.router.parameters(), *self.router.buffers()):
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
        return self

    # -- 1. route ---------------------------------------------------------------------------
    def route(self, x_ND: torch.Tensor, context_NC: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Returns logits_NE and probs_NE (fp32), scores_NK (fp32) and expert ids idx_NK."""
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            if self.router.needs_context:
                logits_NE = self.router(x_ND.float(), None if context_NC is None else context_NC.float()).float()
            else:
                logits_NE = self.router(x_ND.float()).float()
        probs_NE = logits_NE.softmax(dim=-1)
        if self.debug_round_robin:
            n = torch.arange(x_ND.shape[0], device=x_ND.device)
            idx_NK = (n[:, None] + torch.arange(self.top_k, device=x_ND.device)) % self.num_experts
        else:
            select_NE = probs_NE
            if isinstance(self.router, BiasBalanced):
                select_NE = probs_NE + self.router.selection_bias().to(probs_NE)  # choice only, not weights
            if self.knocked_out:
                select_NE = select_NE.index_fill(1, torch.tensor(self.knocked_out, device=x_ND.device), -torch.inf)
            idx_NK = select_NE.topk(self.top_k, dim=-1).indices
        scores_NK = probs_NE.gather(1, idx_NK)
        if self.renormalize and self.top_k > 1:
            scores_NK = scores_NK / scores_NK.sum(-1, keepdim=True)
        return logits_NE, probs_NE, scores_NK, idx_NK

    # -- 2-4. sort, experts, combine ----------------------------------------------------------
    def _backend(self, x: torch.Tensor) -> str:
        """`auto`: grouped where its CUDA kernel runs (bf16/fp16 tokens, or inside bf16/fp16 autocast:
        `forward_grouped` casts), sorted elsewhere (CPU, fp32 on CUDA)."""
        if self.dispatch != "auto":
            return self.dispatch
        half = (torch.bfloat16, torch.float16)
        autocast_half = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) in half
        return "grouped" if x.is_cuda and (x.dtype in half or autocast_half) else "sorted"

    def _mix_sorted(self, x_ND: torch.Tensor, scores_NK: torch.Tensor, idx_NK: torch.Tensor, grouped: bool) -> torch.Tensor:
        N, D = x_ND.shape
        idx_M = idx_NK.reshape(-1)
        order_M = torch.argsort(idx_M, stable=True)  # assignment positions grouped by expert
        counts_E = F.one_hot(idx_M, self.num_experts).sum(0)  # static shape [E] (bincount's is data-dependent)
        x_MD = x_ND.index_select(0, order_M // self.top_k)
        y_MD = self.experts(x_MD, counts_E, grouped=grouped)
        y_MD = (y_MD.float() * scores_NK.reshape(-1)[order_M, None]).to(x_ND.dtype)
        out_MD = y_MD.new_empty(N * self.top_k, D).index_copy_(0, order_M, y_MD)  # in place: no clone of the buffer
        return out_MD if self.top_k == 1 else out_MD.view(N, self.top_k, D).sum(1)

    def _mix_loop(self, x_ND: torch.Tensor, scores_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        """The plain per-expert loop: slow, obviously right; the test oracle."""
        out_ND = torch.zeros_like(x_ND)
        for e in range(self.num_experts):
            tok, k = torch.where(idx_NK == e)
            y = self.experts.expert(e, x_ND[tok]).float() * scores_NK[tok, k, None]
            out_ND = out_ND.index_add(0, tok, y.to(x_ND.dtype))
        return out_ND

    # -- 5. publish ---------------------------------------------------------------------------
    def _publish(self, logits_BTE: torch.Tensor, probs_BTE: torch.Tensor, idx_BTK: torch.Tensor) -> None:
        B, T, E = probs_BTE.shape
        mask_BT = self._token_mask_BT if self._token_mask_BT is not None else probs_BTE.new_ones(B, T, dtype=torch.bool)
        if mask_BT.shape != (B, T):
            raise ValueError(f"token_mask_BT has shape {tuple(mask_BT.shape)} but the layer input is [B={B}, T={T}].")
        w_BT = mask_BT.to(probs_BTE.dtype)
        n_B = w_BT.sum(1).clamp_min(1.0)
        signature_BE = (probs_BTE * w_BT[..., None]).sum(1) / n_B[:, None]
        z_loss = (torch.logsumexp(logits_BTE, -1).pow(2) * w_BT).sum() / w_BT.sum().clamp_min(1.0)
        with torch.no_grad():
            onehot_BTKE = F.one_hot(idx_BTK, E).to(probs_BTE.dtype) * w_BT[..., None, None]
            top1_counts_BE = onehot_BTKE[:, :, 0].sum(1)
            counts_E = onehot_BTKE.sum((0, 1, 2))
            if self.training:
                self.counts.add(counts_E)
            step_counts_E = self.counts.step_total() if self.training else counts_E
            ent_BT = entropy(probs_BTE)
            mean_entropy = (ent_BT * w_BT).sum() / w_BT.sum().clamp_min(1.0)
        probs_mean_E = (signature_BE * n_B[:, None]).sum(0) / n_B.sum()
        self._routing = LayerRouting(probs_mean_E, counts_E, step_counts_E, signature_BE, top1_counts_BE, mean_entropy, z_loss)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        context_NC = None
        if self._context_BC is not None and self.router.needs_context:
            context_NC = self._context_BC.repeat_interleave(T, dim=0)  # (B, C) → (N, C)
        logits_NE, probs_NE, scores_NK, idx_NK = self.route(x_ND, context_NC)
        backend = self._backend(x_ND)
        if backend == "loop":
            out_ND = self._mix_loop(x_ND, scores_NK, idx_NK)
        else:
            out_ND = self._mix_sorted(x_ND, scores_NK, idx_NK, grouped=backend == "grouped")
        self._publish(logits_NE.view(B, T, -1), probs_NE.view(B, T, -1), idx_NK.view(B, T, -1))
        return out_ND.view(B, T, D)
