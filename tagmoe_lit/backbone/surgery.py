"""FFN → MoE surgery on diffusers' `QwenImageTransformer2DModel`.

Touches exactly one attribute: `transformer_blocks[i].img_mlp` (the image-stream FFN, a diffusers
`FeedForward` D → 4D → D with GELU tanh) of the last `num_blocks` blocks. Each is replaced by a
`MoELayer` whose experts are upcycled from that FFN. The text-stream `txt_mlp` stays dense.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tagmoe_lit.moe.layer import MoELayer
from tagmoe_lit.moe.upcycle import upcycle_

MoEFactory = Callable[[int, int], MoELayer]


def install_moe(
    blocks: nn.ModuleList,
    num_blocks: int,
    make_moe: MoEFactory,
    upcycle_noise: float = 0.0,
    upcycle_reinit: float = 0.0,
    seed: int = 0,
) -> list[MoELayer]:
    """Replace `img_mlp` in the last `num_blocks` blocks; return the new layers in block order."""
    if not 0 < num_blocks <= len(blocks):
        raise ValueError(f"moe_blocks={num_blocks} must be between 1 and the number of blocks ({len(blocks)}).")
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for block in blocks[len(blocks) - num_blocks :]:
        ffn = block.img_mlp
        dim, hidden = ffn.net[0].proj.in_features, ffn.net[0].proj.out_features
        moe = make_moe(dim, hidden).to(ffn.net[0].proj.weight.device)
        if ffn.net[0].proj.weight.device.type != "meta":
            upcycle_(moe.experts, ffn, upcycle_noise, upcycle_reinit, generator)
        block.img_mlp = moe
        layers.append(moe)
    return layers
