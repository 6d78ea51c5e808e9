"""The fake world a plan runs in: no GPU, no weights, any world size (docs/plan_spike.md).

Fake tensors hold shapes, dtypes and devices but no data, so the full 20 B model "runs" on a laptop.
What the spike found, and what each piece here does about it:

- the backward pass needs a real CUDA context, so the step runs on **fake CPU** tensors with CUDA's
  choices forced: `grouped` expert dispatch (what `auto` picks on CUDA), bf16 autocast, and
  attention through the flash kernel's own op (`flash_attention`), which is what an H100 runs for
  bf16 without a mask and which `FlopCounterMode` counts (CPU's default SDPA kernel counts 0 FLOPs,
  and CUDA's math fallback would save O(S²) activations);
- `FlopCounterMode` has no formula for `aten._grouped_mm` (the experts would count 0 FLOPs), so one
  is registered (`register_grouped_mm_flops`);
- FSDP2 cannot shard over a fake CUDA mesh (no driver), so it shards over a **CPU mesh on torch's
  `fake` process group** (`fake_world`): parameter bytes do not depend on the device, and every
  collective is recorded by size (`CollectiveLog`) instead of sent;
- the frozen encoders are replaced by stubs that give the configured shapes (`StubCodec`,
  `StubTextEncoder`): their weights are counted in closed form, not built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2·rows·inner·cols of one grouped GEMM: 2-D × 3-D (forward, dx), 2-D × 2-D → 3-D (dW), 3-D × 2-D."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


def register_grouped_mm_flops() -> None:
    """Teach `FlopCounterMode` the grouped GEMM (idempotent)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if torch.ops.aten._grouped_mm not in flop_registry:
        register_flop_formula(torch.ops.aten._grouped_mm)(grouped_mm_flops)


def flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention` as an H100 runs it in bf16: the flash kernel without a mask,
    the memory-efficient one with a mask (both ops run, and are counted, on fake tensors)."""
    if attn_mask is not None:
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]


@contextlib.contextmanager
def cuda_attention() -> Iterator[None]:
    """Route every SDPA call to the kernel CUDA picks (`flash_attention`)."""
    with mock.patch.object(F, "scaled_dot_product_attention", flash_attention):
        yield


@dataclass
class CollectiveLog:
    """Bytes of every collective of a step on one rank: FSDP2's all-gathers and reduce-scatters (with
    the size of the group each ran over: all ranks, or the ranks that share experts under EP), HSDP's
    all-reduces, and expert parallelism's token all_to_alls."""

    all_gather: list[int] = field(default_factory=list)  # output (gathered) bytes per call
    reduce_scatter: list[int] = field(default_factory=list)  # input (unreduced) bytes per call
    all_reduce: list[int] = field(default_factory=list)  # bytes per call (HSDP: gradient shards across replicas)
    all_gather_ranks: list[int] = field(default_factory=list)  # group size of each all-gather
    reduce_scatter_ranks: list[int] = field(default_factory=list)  # group size of each reduce-scatter
    all_to_all: list[int] = field(default_factory=list)  # token bytes per all_to_all (forward, recompute, backward)

    @contextlib.contextmanager
    def recording(self) -> Iterator[CollectiveLog]:
        """Record FSDP2's collectives (`dist.all_gather_single`, `reduce_scatter_single`, and `all_reduce`
        across replicas under HSDP: what it calls) and expert parallelism's token exchanges."""
        from tagmoe_lit.distributed import expert_parallel
        from tagmoe_lit.moe.expert_counts import in_backward

        gather, scatter, reduce = dist.all_gather_single, dist.reduce_scatter_single, dist.all_reduce
        exchange = expert_parallel.all_to_all_single_autograd

        def all_gather(output_tensor, input_tensor, *args, **kwargs):
            self.all_gather.append(output_tensor.numel() * output_tensor.element_size())
            self.all_gather_ranks.append(output_tensor.numel() // max(input_tensor.numel(), 1))
            return gather(output_tensor, input_tensor, *args, **kwargs)

        def reduce_scatter(output, input, *args, **kwargs):
            self.reduce_scatter.append(input.numel() * input.element_size())
            self.reduce_scatter_ranks.append(input.numel() // max(output.numel(), 1))
            return scatter(output, input, *args, **kwargs)

        def all_reduce(tensor, *args, **kwargs):
            self.all_reduce.append(tensor.numel() * tensor.element_size())
            return reduce(tensor, *args, **kwargs)

        def all_to_all(input, *args, **kwargs):
            sent = input.numel() * input.element_size()
            self.all_to_all.extend([sent] if in_backward() else [sent, sent])  # a forward's gradient comes back once
            return exchange(input, *args, **kwargs)

        with mock.patch.object(dist, "all_gather_single", all_gather), \
                mock.patch.object(dist, "reduce_scatter_single", reduce_scatter), mock.patch.object(dist, "all_reduce", all_reduce), \
                mock.patch.object(expert_parallel, "all_to_all_single_autograd", all_to_all):
            yield self


@contextlib.contextmanager
def balanced_expert_splits() -> Iterator[None]:
    """Expert parallelism needs each rank's token counts on the host, which fake tensors do not hold:
    plan with perfectly balanced routing (what the balance loss aims at), every rank sending
    1/ep of its rows to each rank of its group and receiving as many."""
    from tagmoe_lit.distributed.expert_parallel import ExpertParallel

    def balanced(counts_PL: torch.Tensor, recv_PL: torch.Tensor, rows: int) -> tuple[list[int], list[int]]:
        P = counts_PL.shape[0]
        even = [rows // P + (p < rows % P) for p in range(P)]
        return even, even

    with mock.patch.object(ExpertParallel, "splits", staticmethod(balanced)):
        yield


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """torch's `fake` process group of `world_size` ranks (this process is rank 0), torn down after."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("plan needs its own fake process group, but one is already initialized in this process.")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class StubCodec(nn.Module):
    """The configured codec's token shapes without its weights: `encode` gives [B, T, P] tokens."""

    def __init__(self, token_channels: int, patch: int, channels: int, downsample: int):
        super().__init__()
        self._token_channels, self.patch, self.channels, self.downsample = token_channels, patch, channels, downsample

    @property
    def token_channels(self) -> int:
        return self._token_channels

    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        B, _, H, W = images_B3HW.shape
        return images_B3HW.new_zeros(B, (H // self.downsample) * (W // self.downsample), self._token_channels)


class StubTextEncoder(nn.Module):
    """The configured text encoder's width without its weights: `length` unpadded tokens per instruction."""

    def __init__(self, dim: int, length: int):
        super().__init__()
        self.dim, self.length = dim, length

    def forward(self, instructions: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, None]:
        return torch.zeros(len(instructions), self.length, self.dim, device=device), None


class _NoHook:
    def remove(self) -> None:
        """Nothing was registered."""


def frozen_safe(tracker_class: type) -> type:
    """A torch memory tracker that accepts frozen parameters: `MemTracker` registers a gradient hook on
    every parameter of a module it enters, which raises for one without `requires_grad` (the kit
    freezes the last block's dead ends, and `trainable: moe_tail` most of the model)."""

    class FrozenSafe(tracker_class):
        def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
            for p in module.parameters():
                if not p.requires_grad:
                    self._param_to_grad_hook_handles.setdefault(p, (_NoHook(), _NoHook()))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

    FrozenSafe.__name__ = FrozenSafe.__qualname__ = f"FrozenSafe{tracker_class.__name__}"
    return FrozenSafe
