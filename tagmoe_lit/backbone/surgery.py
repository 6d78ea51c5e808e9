"""FFN surgery on diffusers' `QwenImageTransformer2DModel`: FFN → MoE, or FFN → wider FFN.

Touches exactly one attribute: `transformer_blocks[i].img_mlp` (the image-stream FFN, a diffusers
`FeedForward` D → 4D → D with GELU tanh) of the last `num_blocks` blocks. `install_moe` replaces
each by a `MoELayer` whose experts are upcycled from that FFN (a pretrained start, or
`expert_init: tied`) or keep their own independent draws (from scratch); `widen_ffns` by a dense FFN k times
as wide (the ablation's `dense_wide` baseline: with k = the number of experts it holds the MoE's
total parameters, all of them active). The text-stream `txt_mlp` stays dense.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.models.attention import FeedForward
from torch import nn

from tagmoe_lit.moe.layer import MoELayer
from tagmoe_lit.moe.upcycle import Upcycling, upcycle_

MoEFactory = Callable[[int, int], MoELayer]


def _tail(blocks: nn.ModuleList, num_blocks: int) -> nn.ModuleList:
    """The last `num_blocks` blocks, the ones whose image FFN the surgery replaces."""
    if not 0 < num_blocks <= len(blocks):
        raise ValueError(f"moe_blocks={num_blocks} must be between 1 and the number of blocks ({len(blocks)}).")
    return blocks[len(blocks) - num_blocks :]


def install_moe(
    blocks: nn.ModuleList, num_blocks: int, make_moe: MoEFactory, upcycling: Upcycling = Upcycling(),
    pretrained: bool = True,
) -> list[MoELayer]:
    """Replace `img_mlp` in the last `num_blocks` blocks; return the new layers in block order.

    With `pretrained` FFNs, or layers whose `expert_init` is `tied`, experts start as copies of the
    FFN they replace (`upcycle_`, one generator seeded by `upcycling.seed` consumed block by block).
    Otherwise (from scratch) each expert keeps the independent draw its constructor made. On the
    meta device there is nothing to copy yet: materialization runs `MoELayer.reset_parameters`, the
    same from-scratch init (noise and re-init apply to real FFN weights, which a meta build
    receives from `model.init_weights`).
    """
    generator = torch.Generator().manual_seed(upcycling.seed)
    layers = []
    for block in _tail(blocks, num_blocks):
        ffn = block.img_mlp
        dim, hidden = ffn.net[0].proj.in_features, ffn.net[0].proj.out_features
        moe = make_moe(dim, hidden).to(ffn.net[0].proj.weight.device)
        copy = pretrained or moe.expert_init == "tied"
        on_meta = ffn.net[0].proj.weight.device.type == "meta"  # weights come later (`model.init_weights`)
        if not (copy or on_meta) and (upcycling.noise or upcycling.reinit):
            raise ValueError("upcycle_noise / upcycle_reinit perturb experts copied from a dense FFN, but these experts "
                             "are drawn independently (from scratch, expert_init: independent); drop them or set "
                             "expert_init: tied.")
        if copy and not on_meta:
            upcycle_(moe.experts, ffn, upcycling.noise, upcycling.reinit, generator)
        block.img_mlp = moe
        layers.append(moe)
    return layers


def widen_ffns(blocks: nn.ModuleList, num_blocks: int, factor: int) -> None:
    """Replace `img_mlp` in the last `num_blocks` blocks by a freshly initialised FFN D → 4·factor·D → D."""
    for block in _tail(blocks, num_blocks):
        proj = block.img_mlp.net[0].proj
        dim, hidden = proj.in_features, proj.out_features
        with torch.device(proj.weight.device):
            block.img_mlp = FeedForward(dim=dim, dim_out=dim, inner_dim=hidden * factor, activation_fn="gelu-approximate")
