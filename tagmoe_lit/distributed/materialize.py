"""Meta-device builds (`model.meta_init`) made real: allocate, then re-run every declared init.

`materialize_` allocates a module's meta tensors on a device and re-runs every submodule's declared
init, children before parents, as the constructors ran it (a parent such as `LinearRouter`
re-initializes its child `gate`). Lightning's own materialization calls `reset_parameters` only
where a module has one and leaves the rest as uninitialized memory; diffusers' `RMSNorm` has none,
and `AuxFreeBiasRouter.reset_parameters` does not cover its bias buffer, so `INITS` holds their
constructors' values. RoPE tables stay on meta through `to_empty` (plain attributes, DESIGN.md
pitfall 17); that is the model's own repair (`QwenImageBackbone.rebuild_rope`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from diffusers.models.normalization import RMSNorm
from torch import nn

from tagmoe_lit.moe import AuxFreeBiasRouter


def _init_rms_norm(norm: RMSNorm) -> None:
    if norm.weight is not None:
        norm.weight.fill_(1.0)
    if norm.bias is not None:
        norm.bias.zero_()


# What a module's constructor sets that its `reset_parameters` (if any) does not.
INITS: dict[type[nn.Module], Callable[[nn.Module], None]] = {
    RMSNorm: _init_rms_norm,  # diffusers: weight ones, bias zeros
    AuxFreeBiasRouter: lambda router: router.expert_bias.zero_(),
}


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
