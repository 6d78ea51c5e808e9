"""What a training step must cost, written down by hand: the plan's measurements are checked against it.

Legend: B samples per rank, N image tokens per sample (target + reference), L text tokens, S = N + L,
D width, H = 4D FFN hidden, E experts, K top-k, P token channels, Q = patch² · out channels, T the
text encoder's width, W ranks. A GEMM of [m, k] × [k, n] costs 2mkn FLOPs.

Forward FLOPs of one Qwen-Image dual-stream block, per sample:
    projections   2·(N + L)·D²·4          q, k, v, out of each stream
    attention     4·S²·D                  QKᵀ and PV over the joint sequence (all heads)
    FFNs          2·(N + L)·D·H·2         image (dense, or K active experts) and text
    router        2·N·D·E                 MoE blocks only
    modulation    2·D·6D·(z + 1)          img_mod and txt_mod on the timestep embedding; z = 2 with
                                          `zero_cond_t` (img_mod also runs for t = 0), else 1
Outside the blocks: img_in 2·N·P·D, txt_in 2·L·T·D, the timestep MLP z·(2·256·D + 2·D²), norm_out
2·D·2D, proj_out 2·N·D·Q; alignment: the tag table 2·V·S and the head Σ 2·in·out over its linear
layers, called three times (the loss, then the shuffled and constant baselines without gradient).

Backward, everything trainable: a linear layer's weight gradient costs its forward again and its
input gradient once more where the input needs one (2×), except img_in and the timestep MLP's
first layer, whose inputs are data, and the tag table (1×); txt_in's input comes out of a learned
RMSNorm, so it needs one. Flash attention's backward recomputes the scores and runs four more GEMMs
(2.5×). The last block's text output (`to_add_out`, `txt_mlp`) reaches no loss, so it has no
backward. Activation checkpointing runs every block's forward once more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tagmoe_lit.distributed.fsdp2 import split_dim

H100_BF16_FLOPS = 989.4e12  # dense bf16 peak of an H100 SXM (NVIDIA datasheet); the H200 has the same compute
HBM = {"H100": 80e9, "H200": 141e9}  # bytes of GPU memory
NVLINK_BYTES_S = 450e9  # per direction per GPU inside a node (NVLink 4: 900 GB/s both ways)
NETWORK_BYTES_S = 50e9  # per GPU between nodes (one 400 Gb/s InfiniBand NIC per GPU)


@dataclass(frozen=True)
class Shapes:
    """The sizes a step's cost depends on."""

    blocks: int
    moe_blocks: int
    width: int  # D
    hidden: int  # H (the replaced FFN's; every expert's)
    experts: int  # E (0: dense)
    top_k: int
    token_channels: int  # P
    out_channels: int  # Q = patch² · codec channels
    text_dim: int  # T
    image_tokens: int  # N per sample (target + reference frame)
    text_tokens: int  # L per sample
    micro_batch: int  # B per rank
    checkpointing: bool
    zero_cond_t: bool
    tag_macs: int = 0  # V·S of the tag table (0: no alignment)
    head_macs: int = 0  # Σ in·out over the head's linear layers


def block_forward(s: Shapes, moe: bool) -> int:
    """Forward FLOPs of one block for one sample."""
    N, L, D, H = s.image_tokens, s.text_tokens, s.width, s.hidden
    z = 2 if s.zero_cond_t else 1
    flops = 2 * (N + L) * D * D * 4 + 4 * (N + L) ** 2 * D + 2 * L * D * H * 2 + 2 * D * 6 * D * (z + 1)
    return flops + (2 * N * D * H * 2 * s.top_k + 2 * N * D * s.experts if moe else 2 * N * D * H * 2)


def step_flops(s: Shapes) -> dict[str, int]:
    """Forward, backward and recompute FLOPs of one training step on one rank (everything trainable)."""
    N, L, D, H, B = s.image_tokens, s.text_tokens, s.width, s.hidden, s.micro_batch
    z = 2 if s.zero_cond_t else 1
    blocks = sum(block_forward(s, moe=i >= s.blocks - s.moe_blocks) for i in range(s.blocks))
    attention = s.blocks * 4 * (N + L) ** 2 * D
    once = 2 * N * s.token_channels * D + z * 2 * 256 * D + 2 * s.tag_macs  # backward: weight gradient only
    twice = 2 * L * s.text_dim * D + z * 2 * D * D + 2 * D * 2 * D + 2 * N * D * s.out_channels + 2 * s.head_macs
    dead_end = 2 * L * D * D + 2 * L * D * H * 2  # the last block's to_add_out and txt_mlp
    forward = B * (blocks + once + twice + 2 * 2 * s.head_macs)  # + the two baseline calls of the head
    backward = B * (2 * (blocks - attention - dead_end) + 2.5 * attention + once + 2 * twice)
    recompute = B * blocks if s.checkpointing else 0
    return {"forward": forward, "backward": int(backward), "recompute": recompute,
            "total": forward + int(backward) + recompute}


def shard_numel(shape: torch.Size | tuple[int, ...], world: int, expert_split: int = 1) -> int:
    """Elements of one rank's FSDP2 shard: the split dim (`distributed.fsdp2.shard_placement`: dim 0,
    or the longest dim when dim 0 has fewer rows than ranks) cut in ceil(n / W) (the last ranks padded).
    An expert tensor under expert parallelism: its E / `expert_split` local experts over W / `expert_split` ranks."""
    if not shape:
        return 1
    if expert_split > 1:
        shape, world = (shape[0] // expert_split, *shape[1:]), world // expert_split
    dim = split_dim(tuple(shape), world)
    return math.ceil(shape[dim] / world) * math.prod(shape) // shape[dim]


def sharded_bytes(parameters: list[nn.Parameter], world: int, bytes_per_element: int, expert_split: int = 1,
                  experts: frozenset[int] = frozenset()) -> int:
    """Bytes per rank of `parameters` sharded over `world` ranks (1: unsharded); those whose id is in
    `experts` split over `expert_split` expert-parallel ranks first."""
    return sum(shard_numel(p.shape, world, expert_split if id(p) in experts else 1) * bytes_per_element for p in parameters)


def ring_bytes(buffer_bytes: float, ranks: int, all_reduce: bool = False) -> float:
    """Bytes one rank sends in a ring collective over `ranks` of a `buffer_bytes` buffer: (n − 1)/n of it
    for an all-gather or reduce-scatter, twice that for an all-reduce."""
    return (2 if all_reduce else 1) * buffer_bytes * (ranks - 1) / ranks if ranks > 1 else 0.0


def step_seconds(flops: float, mfu: float, nvlink_bytes: float, network_bytes: float,
                 exposed_nvlink: float = 0.0, exposed_network: float = 0.0) -> dict[str, float]:
    """Compute time at `mfu` of the bf16 peak, and collective time: bytes sent inside a node over NVLink,
    between nodes over the network. FSDP's collectives overlap compute, so the step takes the larger of
    the two; the `exposed_*` part of the bytes (expert parallelism's token exchanges, which the next
    computation waits for) adds to the compute side instead. Without overlap, their sum."""
    compute = flops / (H100_BF16_FLOPS * mfu)
    comm = nvlink_bytes / NVLINK_BYTES_S + network_bytes / NETWORK_BYTES_S
    exposed = exposed_nvlink / NVLINK_BYTES_S + exposed_network / NETWORK_BYTES_S
    return {"compute_s": compute, "comm_s": comm, "overlapped_s": max(compute + exposed, comm - exposed),
            "serial_s": compute + comm}


BNB_BLOCK, BNB_MIN_8BIT = 256, 4096  # bitsandbytes' blockwise 8-bit states: block size, smallest 8-bit tensor


def optimizer_state_bytes(optimizer: str, parameters: list[nn.Parameter], world: int, expert_split: int = 1,
                          experts: frozenset[int] = frozenset()) -> int | None:
    """Bytes per rank of the optimizer's states for `parameters` sharded over `world` ranks (None: unknown
    optimizer). torch's Adam(W): two fp32 moments and one fp32 step count per parameter; bitsandbytes'
    8-bit Adam(W): two uint8 moments plus one fp32 absmax per 256-element block each, fp32 moments for
    tensors under 4096 elements; SGD without momentum: none. Expert tensors as in `sharded_bytes`."""
    if optimizer in ("torch.optim.AdamW", "torch.optim.Adam", "tagmoe_lit.optim.AdamW"):
        return sharded_bytes(parameters, world, 8, expert_split, experts) + 4 * len(parameters)
    if optimizer in ("bitsandbytes.optim.AdamW8bit", "bitsandbytes.optim.PagedAdamW8bit"):
        total = 0
        for p in parameters:
            n = shard_numel(p.shape, world, expert_split if id(p) in experts else 1)
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) if p.numel() >= BNB_MIN_8BIT else 8 * n
        return total
    if optimizer == "torch.optim.SGD":
        return 0
    return None
