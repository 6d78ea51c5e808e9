"""The one place where parallelism is applied to the model from outside (FSDP2, with expert
parallelism when configured), and where a meta build is made real.

`TagMoEModule.configure_model` builds its components, freezes what it must, then calls `wrap_model`
once. The order is fixed, as in torchtitan's `parallelize_*`: sharding (which must see the final
module tree: LoRA's adapters are attached before it, by `trainable.settle_parameters`), then materialization of a meta build on the
strategy's device (under FSDP2 each rank allocates only its shards).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from tagmoe_lit.distributed.fsdp2 import parallelize
from tagmoe_lit.distributed.materialize import materialize_, uninitializable
from tagmoe_lit.distributed.strategy import FSDP2Options, FSDP2Strategy

if TYPE_CHECKING:
    from tagmoe_lit.protocols import Backbone


def fsdp2_options(strategy: Strategy | None) -> FSDP2Options:
    """The strategy's FSDP2 settings (`FSDP2Strategy`), or the defaults for a plain ModelParallelStrategy."""
    return strategy.fsdp2 if isinstance(strategy, FSDP2Strategy) else FSDP2Options()


def wrap_model(
    backbone: Backbone, others: list[nn.Module], mesh: DeviceMesh | None, strategy: Strategy | None, meta: bool
) -> None:
    """Shard (FSDP2, when the strategy gave a device mesh) and materialize (meta builds under a trainer).

    Args:
        backbone: its blocks are the FSDP2 units and the activation-checkpointing units.
        others: further trainable components (tag embedder, head), each sharded as one unit.
        mesh: Lightning's `device_mesh` (ModelParallelStrategy), None elsewhere.
        strategy: the trainer's strategy, None without a trainer (inspection, export): a meta build
            then stays on meta.
        meta: the components were built on the meta device.
    """
    if mesh is not None:
        options = fsdp2_options(strategy)
        parallelize(backbone, mesh, backbone.blocks, options.activation_checkpointing, options.hybrid_shard,
                    options.reshard_after_forward, options.param_dtype, options.expert_parallel_size)
        without_autocast_cache(backbone)
        for part in others:  # the tag embedder and the head stay fp32: they are tiny and shape the alignment loss
            parallelize(part, mesh, hybrid_shard=options.hybrid_shard, reshard_after_forward=options.reshard_after_forward)
    if meta and strategy is not None:
        materialize([backbone, *others], strategy)


def without_autocast_cache(module: nn.Module) -> None:
    """Turn autocast's weight-cast cache off while `module` runs forward (checkpoint recomputes inherit it).

    Autocast keeps the bf16 copy of every leaf weight it casts until the outermost autocast region
    ends. FSDP2's gathered parameters are such leaves, so under `bf16-mixed` a rank would hold a bf16
    copy of the whole unsharded model through the forward: `plan` measured 7.44 GiB left after the
    forward of 12 full-width blocks, 0.28 GiB without the cache (docs/plan.md). Without the cache each use
    casts again (a memory-bound copy, small next to the step), and no value changes."""
    state: list[bool] = []

    def off(_module: nn.Module, _args: tuple) -> None:
        state.append(torch.is_autocast_cache_enabled())
        torch.set_autocast_cache_enabled(False)

    def restore(_module: nn.Module, _args: tuple, _output: object) -> None:
        torch.set_autocast_cache_enabled(state.pop())

    module.register_forward_pre_hook(off)
    module.register_forward_hook(restore)


def materialize(parts: list[nn.Module], strategy: Strategy) -> None:
    """Allocate the meta-built components on the strategy's device with their declared init
    (`materialize_`): here for one device, DDP and FSDP2 (sharded already: each rank allocates its
    shards). FSDP1 wraps and materializes unit by unit in its own setup, so it gets `materialize_` as
    its `param_init_fn` (its default calls `reset_parameters` on every module and fails on diffusers'
    RMSNorm, which has none)."""
    unknown = sorted({name for part in parts for name in uninitializable(part)})
    if unknown:
        raise TypeError(f"model.meta_init cannot initialize {', '.join(unknown)} (no reset_parameters and no entry in "
                        "tagmoe_lit.distributed.INITS); add one there, or set meta_init: false.")
    if isinstance(strategy, FSDPStrategy):
        strategy.kwargs["param_init_fn"] = partial(materialize_, device=strategy.root_device)
        return
    for part in parts:
        materialize_(part, strategy.root_device)
