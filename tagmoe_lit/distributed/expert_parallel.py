"""Expert parallelism (EP): each rank of an `ep` group holds E/ep experts of every MoE layer; tokens
travel to their expert's rank and back with `all_to_all`, as torchtitan's `ExpertParallel` does.

Applied from outside the model, by `fsdp2.parallelize` when the strategy sets `expert_parallel_size`:

- **Mesh.** The W ranks form a 2-D mesh (dp_mod_ep, ep), rank = i·ep + j, so one ep group is `ep`
  consecutive ranks (one node's GPUs, where all_to_all is cheapest). Every rank is still a
  data-parallel rank with its own micro-batch: EP shares experts, not batches.
- **Parameters.** Every expert tensor is a DTensor split along its expert axis over `ep`
  (`Shard(0)`), then FSDP2 shards the local experts over `dp_mod_ep` (a 2-D DTensor; a checkpoint
  holds the global [E, …] tensors, so it loads at any ep, or none, after consolidation). Everything
  else (attention, router, embedders) is sharded over all W ranks as without EP.
- **Dispatch** (hooks around `StackedExperts.forward`, whose input is already sorted by expert):
  exchange the per-expert counts (one small all_to_all), send each rank the rows of its experts
  (`all_to_all_single`, autograd-aware), regroup the received rows from (source rank, expert) to
  (expert, source rank) order with a stable sort, run the local experts on them, undo the regrouping,
  send the rows back. Dropless (every row is sent, whatever the imbalance) and deterministic: the
  combine is an `index_copy` with a permutation and the layer's own combine is unchanged.
- **Gradients.** An expert's weight gradient on its rank holds the contributions of every peer's
  tokens; FSDP2 then reduce-scatters it over `dp_mod_ep` and would divide by that group's size.
  Dense gradients are divided by W (the mean over all ranks' losses), so the experts' divide
  factor is set to W too: one process, plain FSDP2 and FSDP2 × EP train the same model.
- **Counts** for the balance loss and bias routers are taken before dispatch, per rank, and reduced
  over all ranks (`moe/expert_counts.py`), as without EP: every rank is a data-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from tagmoe_lit.moe.experts import StackedExperts, compute_dtype


@dataclass(frozen=True)
class EPMeshes:
    """The meshes of an FSDP2 × EP run: `dense` (all ranks, 1-D) shards everything but the experts,
    which are split over `ep` and sharded over `dp` (the ranks that hold the same experts)."""

    dense: DeviceMesh
    dp: DeviceMesh
    ep: DeviceMesh


def ep_meshes(device_type: str, world_size: int, ep: int, num_experts: int) -> EPMeshes:
    """The (dp_mod_ep, ep) mesh and its flat companion; refuses sizes that do not divide."""
    problems = []
    if ep < 1 or world_size % ep:
        problems.append(f"expert_parallel_size={ep} does not divide the {world_size} ranks (choose a divisor of {world_size})")
    if ep >= 1 and num_experts % ep:
        problems.append(f"the {num_experts} experts of each MoE layer cannot be split evenly over expert_parallel_size={ep} "
                        f"ranks (choose a divisor of {num_experts})")
    if problems:
        raise ValueError("Expert parallelism: " + "; ".join(problems) + ".")
    root = init_device_mesh(device_type, (world_size // ep, ep), mesh_dim_names=("dp_mod_ep", "ep"))
    dense = root["dp_mod_ep", "ep"]._flatten("dp_all")
    return EPMeshes(dense=dense, dp=root["dp_mod_ep"], ep=root["ep"])


class ExpertParallel:
    """The dispatch / combine hooks of one `StackedExperts` whose experts are split over `mesh`."""

    def __init__(self, experts: StackedExperts, mesh: DeviceMesh):
        self.group, self.size = mesh.get_group(), mesh.size()
        self.local_experts = experts.num_experts // self.size
        self._pending: list[tuple[list[int], list[int], torch.Tensor]] = []

    def dispatch(self, experts: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """(rows sorted by global expert, counts [E]) → (this rank's experts' rows sorted by local
        expert, their counts [E/ep])."""
        x_MD, counts_E = args[0], args[1]
        P, L = self.size, self.local_experts
        counts_PL = counts_E.view(P, L)  # rows this rank sends to rank p's expert l
        recv_PL = torch.empty_like(counts_PL)  # rows rank p sends to this rank's expert l
        dist.all_to_all_single(recv_PL, counts_PL.contiguous(), group=self.group)
        send, recv = self.splits(counts_PL, recv_PL, x_MD.shape[0])
        x_MD = x_MD.to(compute_dtype(x_MD))  # send what the experts compute in (bf16 under autocast)
        x_RD = all_to_all_single_autograd(x_MD.contiguous(), recv, send, self.group)
        local_R = torch.arange(L, device=x_RD.device).repeat(P).repeat_interleave(recv_PL.flatten(), output_size=sum(recv))
        order_R = torch.argsort(local_R, stable=True)  # (source, expert) order → (expert, source) order
        self._pending.append((send, recv, order_R))
        return (x_RD.index_select(0, order_R), recv_PL.sum(0), *args[2:]), kwargs

    @staticmethod
    def splits(counts_PL: torch.Tensor, recv_PL: torch.Tensor, rows: int) -> tuple[list[int], list[int]]:
        """Rows sent to and received from each rank of the group (on the host: all_to_all needs them;
        `plan` replaces this with balanced routing, as fake tensors hold no counts)."""
        return counts_PL.sum(1).tolist(), recv_PL.sum(1).tolist()

    def combine(self, experts: nn.Module, args: tuple, kwargs: dict, y_RD: torch.Tensor) -> torch.Tensor:
        """The local experts' rows back to the ranks and order they came from."""
        send, recv, order_R = self._pending.pop()
        y_RD = y_RD.new_empty(y_RD.shape).index_copy(0, order_R, y_RD)
        return all_to_all_single_autograd(y_RD, send, recv, self.group)


def shard_experts(experts: StackedExperts, mesh: DeviceMesh) -> None:
    """Split every expert tensor along its expert axis over `mesh` and install the dispatch hooks.

    Every rank holds the same full experts here (one seed, or the same loaded weights), so each keeps
    its chunk without communication; a meta build stays on meta and is drawn shard by shard at
    materialization."""
    if experts.lora is not None:
        raise ValueError("Expert parallelism does not split LoRA adapters on the experts: drop 'experts' from "
                         "model.lora.targets, or set expert_parallel_size: 1.")
    for name, param in list(experts.named_parameters(recurse=False)):
        sharded = distribute_tensor(param.data, mesh, [Shard(0)], src_data_rank=None)  # local chunk, no traffic
        setattr(experts, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    hooks = ExpertParallel(experts, mesh)
    experts.register_forward_pre_hook(hooks.dispatch, with_kwargs=True)
    experts.register_forward_hook(hooks.combine, with_kwargs=True)

