"""`plan`: a fake-tensor training step whose figures agree with closed forms and with a real CPU step.

The tiny config (base.yaml in bf16) is planned on 1 rank and, with the FSDP2 strategy, on 8 fake
ranks: parameter, gradient and optimizer-state bytes must equal the closed form exactly, FLOPs
within 2 % (they agree to the FLOP), collective buffers must be what FSDP2 moves, and the memory the
step adds over its parameters must be within 15 % of a real CPU run of the same step, measured
from the allocator's own events (torch.profiler), not by the plan's tracker. The full-size plan
(60 blocks, width 3072, 8 ranks) is marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT
from tagmoe_lit.plan.cli import guard, main, plan
from tagmoe_lit.plan.closed_form import sharded_bytes
from tagmoe_lit.plan.real import step_bytes
from tagmoe_lit.plan.step import Measured, PlanError, setup

BASE = ["--config", str(ROOT / "experiments/base.yaml"), "--trainer.precision", "bf16-mixed"]
FSDP2 = ["--config", str(ROOT / "experiments/strategy/fsdp2.yaml")]


def _built():
    """The tiny plan's module, built on meta (shapes only)."""
    module = setup(BASE, None, None, None, 32).module
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def tiny():
    return plan(BASE)


@pytest.fixture(scope="module")
def sharded():
    return plan(BASE + FSDP2, world_size=8)


@pytest.mark.parametrize("which", ["tiny", "sharded"])
def test_memory_and_flops_equal_their_closed_forms(which, request):
    p = request.getfixturevalue(which)
    mem, closed = p["memory_bytes"], p["closed_form_bytes"]
    for kind in ("parameters", "gradients", "optimizer_state"):
        assert mem[kind] == closed[kind] > 0, kind
    flops = p["flops"]
    assert abs(flops["measured"] - flops["closed_form"]) <= 0.02 * flops["closed_form"]
    assert flops["experts"] > 0 and p["checks"]["moe_input_dtypes"] == ["bfloat16"]
    assert p["checks"]["attention"] == ["_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"]


def test_sharded_plan_shards_checkpoints_and_moves_what_fsdp2_moves(tiny, sharded):
    assert sharded["config"]["activation_checkpointing"] and not tiny["config"]["activation_checkpointing"]
    assert sharded["flops"]["recompute"] > 0 and sharded["flops"]["measured"] > tiny["flops"]["measured"]
    assert sharded["memory_bytes"]["parameters"] < tiny["memory_bytes"]["parameters"] / 6  # 1/8 plus padding
    W, shapes = 8, sharded["config"]["shapes"]
    assert shapes["checkpointing"]
    comm = sharded["collective_bytes"]
    # every parameter is gathered in forward and again in backward (reshard_after_forward), the head twice
    # more (the two alignment baselines call it again), every gradient reduce-scattered once; fp32 both
    # ways (no mixed-precision policy): buffers are W shards each
    head = sharded_bytes(list(_built().head.parameters()), W, 4)
    params = sharded["closed_form_bytes"]["parameters"] + sharded["untracked_bytes"] // 2
    assert comm["all_gather_buffers"] == 2 * W * params + 2 * W * head
    assert comm["calls"][0] == 2 * (1 + 6 + 1) + 2 * 2  # backbone root, 6 blocks, tag embedder; head 4×
    assert comm["reduce_scatter_buffers"] == W * (sharded["closed_form_bytes"]["gradients"] + sharded["untracked_bytes"] // 2)
    assert comm["sent_per_rank"] == pytest.approx((W - 1) / W * (comm["all_gather_buffers"] + comm["reduce_scatter_buffers"]))
    assert tiny["collective_bytes"]["all_gather_buffers"] == 0


def test_hybrid_shard_splits_inside_a_node_and_all_reduces_gradient_shards_across_nodes():
    """HSDP on 2 nodes × 2 ranks: parameters split over the node's 2 ranks only, the node-local shards of
    the gradients all-reduced across the 2 nodes over the network (2·(R − 1)/R of them sent)."""
    hsdp = ["--trainer.devices", "2", "--trainer.strategy.init_args.hybrid_shard", "true"]
    p = plan(BASE + FSDP2 + hsdp, world_size=4)
    assert p["config"]["shards"] == 2 and p["config"]["hybrid_shard"]
    assert p["memory_bytes"]["parameters"] == p["closed_form_bytes"]["parameters"] == sharded_bytes(list(_built().backbone.parameters()), 2, 4)
    comm = p["collective_bytes"]
    shards = p["closed_form_bytes"]["gradients"] + p["untracked_bytes"] // 2
    assert 0 <= comm["all_reduce_buffers"] - shards <= 64  # the reduce-scatter output keeps FSDP2's padding of uneven splits
    assert comm["sent_over_network"] == comm["all_reduce_buffers"]  # 2 · (2 − 1)/2 of each buffer
    with pytest.raises(PlanError, match=r"hybrid_shard needs whole nodes, but 3 ranks do not divide into nodes of 2"):
        plan(BASE + FSDP2 + hsdp, world_size=3)


def test_planned_step_memory_is_within_15_percent_of_a_real_cpu_step(tiny):
    real = step_bytes(BASE)
    assert real["backbone_parameter_bytes"] == sum(p.numel() * 4 for p in _built().backbone.parameters())
    planned = tiny["memory_bytes"]["peak"] - tiny["memory_bytes"]["peak_by_kind"]["Parameter"]
    assert abs(planned - real["step_peak_bytes"]) <= 0.15 * real["step_peak_bytes"], \
        f"planned {planned / 2**20:.1f} MiB vs real {real['step_peak_bytes'] / 2**20:.1f} MiB"


@pytest.mark.slow
def test_sharded_plan_bounds_a_real_two_rank_step(tmp_path):
    """FSDP2 on 2 gloo processes: the planned peak is an upper bound of rank 0's real one (torch's
    FSDP tracker does not see some of the backward's frees on fake tensors, docs/plan.md)."""
    out = tmp_path / "real.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tagmoe_lit.plan.real", str(out), *BASE, *FSDP2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    real = json.loads(out.read_text())
    planned = plan(BASE + FSDP2, world_size=2)
    assert real["backbone_parameter_bytes"] == planned["memory_bytes"]["parameters"]
    peak = planned["memory_bytes"]["peak"] - planned["memory_bytes"]["parameters"]
    assert real["step_peak_bytes"] <= peak <= 2.5 * real["step_peak_bytes"]


def test_a_step_that_is_not_the_gpu_step_is_refused():
    s = setup(BASE, None, None, None, 32)
    s.module.configure_model()
    ok = dict(peak={}, after_step={}, flops=1, expert_flops=1, moe_dtypes=["bfloat16"],
              attention_ops=["_scaled_dot_product_flash_attention"])
    guard(s, Measured(**ok))
    with pytest.raises(PlanError, match=r"received \['float32'\] tokens under bf16-mixed \(autocast did not apply\)"):
        guard(s, Measured(**{**ok, "moe_dtypes": ["float32"]}))
    with pytest.raises(PlanError, match="the experts counted 0 FLOPs"):
        guard(s, Measured(**{**ok, "expert_flops": 0}))
    with pytest.raises(PlanError, match=r"attention ran \['_safe_softmax'\], not CUDA's flash"):
        guard(s, Measured(**{**ok, "attention_ops": ["_safe_softmax"]}))


def test_bad_plans_are_refused_in_one_sentence(capsys):
    with pytest.raises(PlanError, match="image size 18×16 is not a multiple of the codec's 4 pixels per token"):
        plan(BASE, image_hw=(18, 16))
    with pytest.raises(PlanError, match="runs the sorted backend for fp32 on CUDA"):
        plan(BASE[:2])  # base.yaml trains in 32-true
    with pytest.raises(PlanError, match="world size 1 and micro-batch 0 must both be at least 1"):
        plan(BASE, micro_batch=0)
    with pytest.raises(PlanError, match="2 ranks without FSDP2: under DDP every rank holds what one does"):
        plan(BASE, world_size=2)
    with pytest.raises(PlanError, match="plan follows FSDP2"):
        plan(BASE + ["--config", str(ROOT / "experiments/strategy/fsdp.yaml")], world_size=2)


def test_a_bf16_parameter_gather_halves_the_gathered_bytes_and_keeps_routers_fp32(sharded):
    """`param_dtype: bfloat16`: the stored shards and the fp32 gradient reduce-scatter stay; the
    all-gathered parameters are bf16, but for the routers (their own fp32 units) and the tag
    embedder and head (fp32 roots of their own)."""
    bf16 = plan(BASE + FSDP2 + ["--trainer.strategy.init_args.param_dtype", "bfloat16"], world_size=8)
    fp32, half = sharded["collective_bytes"], bf16["collective_bytes"]
    assert bf16["memory_bytes"]["parameters"] == sharded["memory_bytes"]["parameters"]
    assert half["reduce_scatter_buffers"] == fp32["reduce_scatter_buffers"]
    assert 0.5 * fp32["all_gather_buffers"] < half["all_gather_buffers"] < 0.6 * fp32["all_gather_buffers"]
    assert half["calls"][0] > fp32["calls"][0]  # the routers' own all-gathers


def test_every_rank_holds_the_frozen_encoders_whole(tiny, sharded):
    """Not sharded, not in the tracked step: added per rank. The bundled MiniLM in fp32; Qwen-Image's
    Qwen2.5-VL-7B and VAE counted on meta from their configs (the release's published sizes)."""
    from tagmoe_lit.backbone import FrozenTextEncoder
    from tagmoe_lit.plan.encoders import qwen_vae_parameters, qwen_vl_parameters

    minilm = sum(p.numel() * 4 for p in FrozenTextEncoder().frozen_model().parameters())
    for p in (tiny, sharded):
        assert p["memory_bytes"]["frozen_encoders"] == {"text encoder": minilm, "codec": 0}  # a pixel codec holds nothing
        assert p["memory_bytes"]["peak_with_encoders"] == p["memory_bytes"]["peak"] + minilm
    assert qwen_vl_parameters() == 8_292_166_656 and qwen_vae_parameters() == 126_892_531


def test_the_command_prints_a_table_or_json(capsys):
    main([*BASE[:2], "--trainer.precision", "bf16-mixed", "--micro_batch", "2"])
    out = capsys.readouterr().out
    assert "| parameters |" in out and "micro-batch 2" in out and "H100 at MFU 0.4" in out
    assert "| + frozen text encoder (a whole copy on every rank) |" in out and "peak total, with the frozen encoders" in out


@pytest.mark.slow
def test_full_size_qwen_image_plans_on_8_ranks():
    """The 20 B TAG-MoE on 8 fake ranks: 22,695,294,528 parameters (the `params` table), sharded exactly."""
    args = BASE[:2] + ["--config", str(ROOT / "experiments/model/qwen_image.yaml"), *FSDP2]
    p = plan(args, world_size=8, micro_batch=1, image_hw=(512, 512))
    assert p["memory_bytes"]["parameters"] == p["closed_form_bytes"]["parameters"]
    assert p["parameter_count"]["backbone"] == 22_695_294_528
    assert p["host_ram_bytes"]["start_from_weights"] == 2 * sum(p["parameter_count"].values())
    assert abs(p["flops"]["measured"] - p["flops"]["closed_form"]) <= 0.02 * p["flops"]["closed_form"]
    assert p["memory_bytes"]["frozen_encoders"] == {"text encoder": 8_292_166_656 * 2, "codec": 126_892_531 * 4}  # bf16, fp32


def test_8bit_adamw_state_closed_form_equals_bitsandbytes_real_states():
    """bitsandbytes' kernels read data, so a plan cannot run them on fake tensors: its states come from
    the closed form, checked here against a real AdamW8bit step on the tiny model's parameters."""
    import bitsandbytes as bnb
    import torch

    from tagmoe_lit.plan.closed_form import optimizer_state_bytes

    params = [torch.nn.Parameter(torch.randn(p.shape)) for p in _built().parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    real = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.data_ptr() not in {q.data_ptr() for q in (optimizer.name2qmap.values())})
    assert optimizer_state_bytes("bitsandbytes.optim.AdamW8bit", params, 1) == real


# -- expert parallelism ------------------------------------------------------------------------------
EP2 = ["--trainer.strategy.init_args.expert_parallel_size", "2"]


def test_expert_parallel_plan_gathers_fewer_experts_and_moves_tokens(sharded):
    """EP over 2 of the 8 ranks: memory still equals the closed form (each rank's local experts
    sharded over the 4 ranks that share them), fewer expert bytes are gathered, the FLOPs do not
    change, and the token all_to_alls equal their closed form under balanced routing: every MoE
    layer sends its tokens out and back (dispatch, combine) in forward, the checkpoint recompute and
    backward, in bf16, keeping 1/ep of them."""
    p = plan(BASE + FSDP2 + EP2, world_size=8)
    mem, closed, s = p["memory_bytes"], p["closed_form_bytes"], p["config"]["shapes"]
    for kind in ("parameters", "gradients", "optimizer_state"):
        assert mem[kind] == closed[kind] > 0, kind
    assert p["config"]["expert_parallel_size"] == 2 and s["checkpointing"]
    exchange = s["micro_batch"] * s["image_tokens"] * s["top_k"] * s["width"] * 2  # bf16 tokens
    comm = p["collective_bytes"]
    assert comm["all_to_all_buffers"] == s["moe_blocks"] * 2 * 3 * exchange
    assert comm["tokens_sent_per_rank"] == comm["all_to_all_buffers"] / 2
    assert comm["all_gather_buffers"] < sharded["collective_bytes"]["all_gather_buffers"]
    assert p["flops"]["measured"] == sharded["flops"]["measured"]


@pytest.mark.parametrize("world, ep, words", [(6, 4, "expert_parallel_size=4 does not divide the 6 ranks"),
                                               (6, 3, "the 4 experts of each MoE layer cannot be split evenly")])
def test_expert_parallel_plan_refuses_sizes_that_do_not_divide(world, ep, words):
    with pytest.raises(ValueError, match=words):
        plan(BASE + FSDP2 + ["--trainer.strategy.init_args.expert_parallel_size", str(ep)], world_size=world)
