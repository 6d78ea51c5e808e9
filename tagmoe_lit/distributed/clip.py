"""Gradient clipping by the global norm when gradients live on several device meshes.

torch's `clip_grad_norm_` stacks every gradient's norm into one tensor, which fails for DTensors on
different meshes, as expert parallelism makes them: the experts' on (dp_mod_ep, ep), everything
else on all ranks (`expert_parallel.py`). As torchtitan does for EP, the norm is taken per group of
gradients that share a mesh and placements, each group's made a plain (replicated) number, and the
squares summed; then every group is scaled by the one global coefficient. With one mesh, or none,
Lightning's own clipping runs unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import lightning as L
import torch
from torch.distributed.tensor import DTensor


def grad_groups(parameters: Iterable[torch.nn.Parameter]) -> dict[object, list[torch.nn.Parameter]]:
    """Parameters with a gradient, grouped by the gradient's (mesh, placements); plain tensors under None."""
    groups: dict[object, list[torch.nn.Parameter]] = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            g = p.grad
            groups[(g.device_mesh, g.placements) if isinstance(g, DTensor) else None].append(p)
    return dict(groups)


def global_grad_norm(groups: dict[object, list[torch.nn.Parameter]]) -> torch.Tensor:
    """The L2 norm of all gradients together, as a plain tensor equal on every rank."""
    total = torch.zeros(())
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        total = total.to(norm.device) + norm.float() ** 2
    return total.sqrt()


def clip_gradients(module: L.LightningModule, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                   gradient_clip_algorithm: str | None = None) -> None:
    """`LightningModule.configure_gradient_clipping`: Lightning's clipping, except by norm across
    several meshes, where it takes the global norm group by group."""
    groups = grad_groups(p for group in optimizer.param_groups for p in group["params"])
    by_value = gradient_clip_algorithm not in (None, "norm")  # elementwise: any mesh is fine
    if not gradient_clip_val or by_value or len(groups) < 2 or all(key is None for key in groups):
        module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        return
    total = global_grad_norm(groups)
    for params in groups.values():
        torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, total)
