"""Parallelism applied from outside the model: FSDP2 (`fully_shard`) and consolidation of its checkpoints.

The model only exposes its blocks (`QwenImageBackbone.blocks`); this file decides how they are
sharded, as torchtitan's `parallelize_*` functions do, in a fixed order: activation checkpointing
on each block, `fully_shard` on each block, then `fully_shard` on the root, so every parameter
outside the blocks (embedders, norms, MoE heads) is sharded and its gradients are reduced too.
`TagMoEModule.configure_model` calls `parallelize` only under Lightning's `ModelParallelStrategy`
(which sets `device_mesh`); Lightning's FSDP1 `FSDPStrategy` wraps by class from its YAML instead.

Lightning's mesh is 2-D (`data_parallel` × `tensor_parallel`, by default nodes × devices per node).
TAG-MoE has no tensor parallelism, so every rank is a data-parallel rank: the default shards each
parameter over all ranks (FSDP); `hybrid_shard` shards within the mesh's last dim and replicates
across its first (HSDP: shard within a node, replicate across nodes).

Meta-device builds (`model.meta_init`) are materialized here too: `materialize_` allocates a
module's meta tensors on a device and re-runs every submodule's declared init, children before
parents, as the constructors ran it (a parent such as `LinearRouter` re-initializes its child
`gate`). Lightning's own materialization calls `reset_parameters` only where a module has one and
leaves the rest as uninitialized memory; diffusers' `RMSNorm` and `MoELayer`'s count buffer have
none, and `AuxFreeBiasRouter.reset_parameters` does not cover its bias buffer, so `INITS` holds
their constructors' values. RoPE tables stay on meta through `to_empty` (plain attributes,
DESIGN.md pitfall 17); that is the model's own repair (`QwenImageBackbone.rebuild_rope`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.models.normalization import RMSNorm
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tagmoe_lit.moe import AuxFreeBiasRouter, MoELayer


def _init_rms_norm(norm: RMSNorm) -> None:
    if norm.weight is not None:
        norm.weight.fill_(1.0)
    if norm.bias is not None:
        norm.bias.zero_()


# What a module's constructor sets that its `reset_parameters` (if any) does not.
INITS: dict[type[nn.Module], Callable[[nn.Module], None]] = {
    RMSNorm: _init_rms_norm,  # diffusers: weight ones, bias zeros
    MoELayer: lambda layer: layer.pending_counts_E.zero_(),
    AuxFreeBiasRouter: lambda router: router.expert_bias.zero_(),
}


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


def parallelize(
    module: nn.Module,
    device_mesh: DeviceMesh,
    blocks: nn.ModuleList | None = None,
    activation_checkpointing: bool = False,
    hybrid_shard: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2 on `module`: optionally checkpoint each of `blocks`, shard each block, then the root.

    Args:
        module: the root to shard (e.g. the backbone); its parameters outside `blocks` form the root unit.
        device_mesh: the strategy's mesh (Lightning's `LightningModule.device_mesh`).
        blocks: the transformer blocks inside `module`, each its own unit (replaced in place when checkpointed).
        activation_checkpointing: recompute each block's activations in backward (`checkpoint_wrapper`).
        hybrid_shard: HSDP over a 2-D mesh instead of sharding over all ranks (see module doc).
        reshard_after_forward: free gathered parameters after forward (ZeRO-3); False keeps them to backward.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import fully_shard

    mesh = shard_mesh(device_mesh, hybrid_shard)
    for i, block in enumerate(blocks if blocks is not None else []):
        if activation_checkpointing:
            blocks[i] = block = checkpoint_wrapper(block)
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return module


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def _extra_inits(module: nn.Module) -> list[Callable[[nn.Module], None]]:
    return [init for cls, init in INITS.items() if isinstance(module, cls)]


def uninitializable(module: nn.Module) -> list[str]:
    """Classes under `module` that hold tensors but have neither `reset_parameters` nor an entry in `INITS`."""
    return sorted({
        type(m).__name__ for m in module.modules()
        if _own_tensors(m) and not callable(getattr(m, "reset_parameters", None)) and not _extra_inits(m)
    })


def _meta_region(module: nn.Module) -> list[nn.Module]:
    """The modules under `module` whose subtree still holds meta tensors, children before parents.

    Already materialized subtrees (e.g. blocks FSDP1 has wrapped before their parent) are left out."""
    region: list[nn.Module] = []

    def visit(m: nn.Module) -> bool:
        children = [visit(child) for child in m.children()]  # every child, no short-circuit
        if any(children) or any(t.is_meta for t in _own_tensors(m)):
            region.append(m)
            return True
        return False

    visit(module)
    return region


@torch.no_grad()
def materialize_(module: nn.Module, device: torch.device | str) -> None:
    """Allocate `module`'s meta tensors on `device` and run the declared init of every module they
    belong to, children first (the constructors' order); a no-op when nothing is on meta.

    Works on a plain module, on one sharded with FSDP2 (its DTensors are initialized shard by
    shard), and as FSDP1's `param_init_fn`, which FSDP calls for each module of a unit it wraps
    (the first call materializes the whole unit, later ones find nothing left on meta).
    """
    region = _meta_region(module)
    if not region:
        return
    if all(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        module.to_empty(device=device)  # from the root, as FSDP2 needs to re-register its sharded parameters
    else:
        for m in region:
            m.to_empty(device=device, recurse=False)
    for m in region:
        if callable(reset := getattr(m, "reset_parameters", None)):
            reset()
        for init in _extra_inits(m):
            init(m)


def consolidate_checkpoint(folder: str | Path, output: str | Path) -> Path:
    """One `.ckpt` file from a ModelParallelStrategy checkpoint directory, loadable in a single process.

    The directory holds each rank's shards (torch.distributed.checkpoint) and `meta.pt` (step,
    loops, callbacks, the `tagmoe` record). The result holds the full `state_dict` and that
    metadata, so `validate` / `test` / `predict --ckpt_path` and `convert export` read it like any
    single-process checkpoint. Optimizer states are left out: their sharded form is keyed by
    parameter name, which a plain optimizer cannot load; resume training from the directory
    itself (torch.distributed.checkpoint reshards it to any world size).
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder, output = Path(folder), Path(output)
    if not (folder / ".metadata").is_file() or not (folder / "meta.pt").is_file():
        raise ValueError(f"{folder} is not a ModelParallelStrategy checkpoint directory (no .metadata / meta.pt); "
                         "pass the `.ckpt` directory the run saved.")
    gathered = output.with_name(f".{output.name}.gathered")
    partial = output.with_name(f".{output.name}.partial")
    try:
        dcp_to_torch_save(folder, gathered)  # every shard, gathered without a process group
        state_dict = torch.load(gathered, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
        metadata = torch.load(folder / "meta.pt", map_location="cpu", weights_only=True)
        torch.save({**metadata, "state_dict": state_dict}, partial)
        os.replace(partial, output)  # a failure above never leaves a truncated .ckpt that looks valid
    finally:
        gathered.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return output


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tagmoe_lit.parallel", description=consolidate_checkpoint.__doc__.splitlines()[0])
    parser.add_argument("folder", help="the checkpoint directory a ModelParallelStrategy run saved (e.g. last.ckpt/)")
    parser.add_argument("output", help="the single .ckpt file to write")
    args = parser.parse_args()
    print(f"Wrote {consolidate_checkpoint(args.folder, args.output)}")
