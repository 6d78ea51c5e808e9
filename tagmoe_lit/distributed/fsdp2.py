"""FSDP2 (`fully_shard`) applied from outside the model, in torchtitan's fixed order.

The model only exposes its blocks (`QwenImageBackbone.blocks`); this file decides how they are
sharded: activation checkpointing on each block, `fully_shard` on each block, then `fully_shard` on
the root, so every parameter outside the blocks (embedders, norms, MoE heads) is sharded and its
gradients are reduced too. A parameter splits along dim 0, or along its longest dim when dim 0 has
fewer rows than there are ranks (`shard_placement`: the stacked experts and routers have E rows). `tagmoe_lit.distributed.wrap.wrap_model` calls `parallelize` only
under Lightning's `ModelParallelStrategy` (which sets `device_mesh`); Lightning's FSDP1
`FSDPStrategy` wraps by class from its YAML instead.

Lightning's mesh is 2-D (`data_parallel` × `tensor_parallel`, by default nodes × devices per node).
TAG-MoE has no tensor parallelism, so every rank is a data-parallel rank: the default shards each
parameter over all ranks (FSDP); `hybrid_shard` shards within the mesh's last dim and replicates
across its first (HSDP: shard within a node, replicate across nodes).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Shard

from tagmoe_lit.distributed.expert_parallel import ep_meshes, shard_experts


def shard_mesh(device_mesh: DeviceMesh, hybrid_shard: bool = False) -> DeviceMesh:
    """The mesh to shard over: all ranks as one dim (FSDP), or Lightning's 2-D mesh as (replicate, shard)."""
    if hybrid_shard:
        if device_mesh.ndim != 2:
            raise ValueError(f"hybrid_shard needs a 2-D device mesh (replicate × shard) but got {device_mesh.ndim} dims; "
                             "use Lightning's ModelParallelStrategy, whose mesh is nodes × devices.")
        return device_mesh
    if device_mesh.ndim == 1:
        return device_mesh
    return init_device_mesh(device_mesh.device_type, (device_mesh.size(),), mesh_dim_names=("shard",))


def shard_placement(shards: int, expert_split: int = 1):
    """Where each parameter is split: dim 0 (FSDP's default), unless dim 0 has fewer rows than there
    are shards and another dim is longer; then that one. The stacked experts `[E, D, H]` and routers
    `[E, D]` have E = 4 rows: split on dim 0, every rank beyond the fourth would hold a padded copy
    of a whole expert slice (`plan` measured 3.96 GiB of parameters per rank at 64 ranks instead of
    1.32; docs/plan.md), so they split along their width instead. Under expert parallelism a rank
    holds E / `expert_split` experts, the rows FSDP2 splits."""

    def place(param: nn.Parameter) -> Shard | None:
        dim = split_dim((param.shape[0] // expert_split, *param.shape[1:]), shards)
        return None if dim == 0 else Shard(dim)

    return place


def split_dim(shape: tuple[int, ...], shards: int) -> int:
    """The dim `shard_placement` splits a parameter of `shape` along (0 for scalars and vectors)."""
    if len(shape) < 2 or shape[0] >= shards:
        return 0
    return max(range(len(shape)), key=lambda d: shape[d])


def parallelize(
    module: nn.Module,
    device_mesh: DeviceMesh,
    blocks: nn.ModuleList | None = None,
    activation_checkpointing: bool = False,
    hybrid_shard: bool = False,
    reshard_after_forward: bool = True,
    param_dtype: str | None = None,
    expert_parallel_size: int = 1,
) -> nn.Module:
    """FSDP2 on `module`: optionally checkpoint each of `blocks`, shard each block, then the root.

    Args:
        module: the root to shard (e.g. the backbone); its parameters outside `blocks` form the root unit.
        device_mesh: the strategy's mesh (Lightning's `LightningModule.device_mesh`).
        blocks: the transformer blocks inside `module`, each its own unit (replaced in place when checkpointed).
        activation_checkpointing: recompute each block's activations in backward (`checkpoint_wrapper`).
        hybrid_shard: HSDP over a 2-D mesh instead of sharding over all ranks (see module doc).
        reshard_after_forward: free gathered parameters after forward (ZeRO-3); False keeps them to backward.
        param_dtype: gather parameters in this dtype ("bfloat16": half the all-gather bytes and the
            gathered copies) and reduce gradients in fp32 (`MixedPrecisionPolicy`); None gathers
            them as stored (fp32). The MoE routers are then units of their own, gathered in fp32:
            routing stays in full precision (DESIGN.md pitfall 4).
        expert_parallel_size: > 1 splits every MoE layer's experts over that many consecutive ranks
            (`expert_parallel.py`): each layer's experts become a unit of their own, sharded over the
            ranks that hold the same experts, their gradients divided by the world size.
    """
    import torch
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from tagmoe_lit.moe.layer import MoELayer

    layers = [m for m in module.modules() if isinstance(m, MoELayer)]
    ep = expert_parallel_size
    if ep > 1 and hybrid_shard:
        raise ValueError("expert_parallel_size > 1 with hybrid_shard: true is not supported; shard over all ranks "
                         "(hybrid_shard: false) or set expert_parallel_size: 1.")
    if ep > 1 and any(layer.dispatch == "loop" for layer in layers):
        raise ValueError("Expert parallelism runs the sorted or grouped expert backend; dispatch 'loop' (the test "
                         "oracle) reads every expert on every rank: set the MoE dispatch to auto, sorted or grouped.")
    meshes = ep_meshes(device_mesh.device_type, device_mesh.size(), ep, layers[0].num_experts) if ep > 1 and layers else None
    mesh = meshes.dense if meshes else shard_mesh(device_mesh, hybrid_shard)
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "shard_placement_fn": shard_placement(mesh.size(-1))}
    if param_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype), reduce_dtype=torch.float32)
        fp32 = {**options, "mp_policy": MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)}
        for layer in layers:
            fully_shard(layer.router, **fp32)
    if meshes:
        experts_options = {**options, "mesh": meshes.dp, "shard_placement_fn": shard_placement(meshes.dp.size(), meshes.ep.size())}
        for layer in layers:
            shard_experts(layer.experts, meshes.ep)
            fully_shard(layer.experts, **experts_options)
            layer.experts.set_gradient_divide_factor(float(device_mesh.size()))
            layer.experts.set_force_sum_reduction_for_comms(True)  # sum, then divide: gloo has no PREMUL_SUM
    for i, block in enumerate(blocks if blocks is not None else []):
        if activation_checkpointing:
            blocks[i] = block = checkpoint_wrapper(block)
        fully_shard(block, **options)
    fully_shard(module, **options)
    return module
