"""Expert parallelism (`distributed/expert_parallel.py`): 4 CPU processes as 2 dp × 2 ep train what
one process trains on the same global batch, and their checkpoint is an ordinary one.

Two levels: gradients of two MoE layers through `parallelize` (spawned gloo workers; the sorted and
the grouped backend, a rank whose experts get no token, the global gradient norm and clipping
across meshes), and the CLI end to end under torchrun (losses, weights, consolidation, resume
without EP, `convert export`). Both are `slow` (process start-up); the bad-input checks are not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import FSDP2, KNOCKOUT, PER_RANK, STEPS, assert_same_run, single, torchrun
from tagmoe_lit.__main__ import run
from tagmoe_lit.distributed import parallelize
from tagmoe_lit.distributed.clip import clip_gradients, global_grad_norm, grad_groups
from tagmoe_lit.distributed.expert_parallel import ep_meshes, shard_experts
from tagmoe_lit.moe import MoELayer
from tagmoe_lit.moe.experts import StackedExperts

EP2 = [*FSDP2, "--trainer.strategy.expert_parallel_size", "2"]  # with KNOCKOUT, ep rank 1's experts get no token in layer 0


class TwoMoE(nn.Module):
    """Two residual MoE layers: layer 0 never selects experts 1-3, layer 1 routes freely."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([MoELayer(8, 16, dispatch="sorted"), MoELayer(8, 16, dispatch="grouped")])
        self.blocks[0].knockout((1, 2, 3))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x_BTD = x_BTD + block(x_BTD)
        return x_BTD


def _loss(model: nn.Module, x_BTD: torch.Tensor) -> torch.Tensor:
    return model(x_BTD).pow(2).mean()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _ep_worker(rank: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=4)
    x_BTD = torch.randn(8, 5, 8, generator=torch.Generator().manual_seed(1))
    reference = TwoMoE()
    _loss(reference, x_BTD).backward()  # one process, the global batch
    expected = {n: p.grad.clone() for n, p in reference.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)

    from torch.distributed.device_mesh import init_device_mesh

    model = parallelize(TwoMoE(), init_device_mesh("cpu", (4,)), expert_parallel_size=2)
    _loss(model, x_BTD[2 * rank: 2 * rank + 2]).backward()
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    result = {"grad_diff": max((grads[n] - expected[n]).abs().max().item() for n in expected),
              "norm": global_grad_norm(grad_groups(model.parameters())).item(), "expected_norm": norm.item(),
              "expert_mesh": list(model.blocks[0].experts.w1_EDH.device_mesh.mesh_dim_names),
              "meshes": len(grad_groups(model.parameters()))}
    clip_gradients(None, torch.optim.SGD(model.parameters(), lr=0.0), gradient_clip_val=0.01)
    result["clipped_diff"] = max((_full(p.grad) - r.grad).abs().max().item()
                                 for p, r in zip(model.parameters(), reference.parameters()))
    Path(out.format(rank)).write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_expert_parallel_gradients_equal_one_process(tmp_path):
    """2 dp × 2 ep: every gradient (experts, routers) equals the one-process gradient of the global
    batch, also where an ep rank's experts received no token; the global norm and clipping too."""
    out = str(tmp_path / "rank{}.json")
    torch.multiprocessing.spawn(_ep_worker, args=(str(tmp_path / "store"), out), nprocs=4)
    results = [json.loads(Path(out.format(r)).read_text()) for r in range(4)]
    for result in results:
        assert result["expert_mesh"] == ["dp_mod_ep", "ep"] and result["meshes"] >= 2
        assert result["grad_diff"] < 1e-5, result
        assert result["norm"] == pytest.approx(result["expected_norm"], rel=1e-5)
        assert result["clipped_diff"] < 1e-6, result
    print(f"\nEP 2 dp × 2 ep vs one process: max gradient difference {max(r['grad_diff'] for r in results):.1e}")


@pytest.mark.slow
def test_fsdp2_with_expert_parallelism_trains_as_one_process_and_resumes_without_it(tmp_path):
    """The CLI under torchrun, 4 ranks as 2 dp × 2 ep, three idle experts: the same losses and
    weights as one process; the sharded checkpoint consolidates to global [E, …] experts, resumes in
    one process (no EP) and exports as a diffusers model."""
    single(tmp_path / "one", *KNOCKOUT)
    seconds = torchrun(tmp_path / "four", *EP2, *KNOCKOUT, ranks=4)
    diff = assert_same_run(tmp_path / "one", tmp_path / "four", ranks=4)  # consolidates the checkpoint
    print(f"\nFSDP2 × EP 4 ranks (2 dp × 2 ep) vs 1×{2 * PER_RANK}: max loss difference {diff:.2e}, {seconds:.1f} s")
    consolidated = tmp_path / "four" / "consolidated.ckpt"
    state = torch.load(consolidated, weights_only=True)["state_dict"]
    assert next(v for k, v in state.items() if k.endswith("experts.w1_EDH")).shape[0] == 4
    one_more = ["--trainer.max_steps", str(STEPS + 1), "--ckpt_path"]
    single(tmp_path / "resumed", *one_more, str(consolidated))  # weights and Adam states from the EP run
    single(tmp_path / "continued", *one_more, str(next((tmp_path / "one").glob("**/last.ckpt"))))
    step = [json.loads((tmp_path / run / "losses" / "losses_rank0.json").read_text()) for run in ("resumed", "continued")]
    assert len(step[0]) == len(step[1]) == 1 and abs(step[0][0]["loss"] - step[1][0]["loss"]) < 1e-5, step
    config = next((tmp_path / "four").glob("**/config.yaml"))
    out = run(["convert", "export", "--config", str(config), "--ckpt_path", str(consolidated), "--dst", str(tmp_path / "x")])
    assert "tagmoe_transformer.json" in out["files"]


# -- bad input (no processes needed) ----------------------------------------------------------------
@pytest.mark.parametrize("world, ep, experts, words", [
    (6, 4, 4, "expert_parallel_size=4 does not divide the 6 ranks"),
    (6, 3, 4, "the 4 experts of each MoE layer cannot be split evenly over expert_parallel_size=3"),
    (4, 0, 4, "expert_parallel_size=0 does not divide the 4 ranks"),
])
def test_expert_parallel_refuses_sizes_that_do_not_divide(world, ep, experts, words):
    with pytest.raises(ValueError, match=words):
        ep_meshes("cpu", world, ep, experts)


def test_expert_parallel_refuses_hybrid_shard_loop_dispatch_and_expert_lora():
    with pytest.raises(ValueError, match="hybrid_shard"):
        parallelize(TwoMoE(), None, hybrid_shard=True, expert_parallel_size=2)
    loop = nn.Module()
    loop.layer = MoELayer(8, 16, dispatch="loop")
    with pytest.raises(ValueError, match="dispatch 'loop'"):
        parallelize(loop, None, expert_parallel_size=2)
    experts = StackedExperts(4, 8, 16)
    experts.lora = nn.Module()
    with pytest.raises(ValueError, match="drop 'experts' from model.lora.targets"):
        shard_experts(experts, None)

