"""Spike for issue 17 (a `plan` command): what breaks when the kit's full-size code paths run on fake
CUDA tensors without a GPU, and the fallback for each (DESIGN.md pitfall 28).

Each probe runs the real kit code (MoELayer, QwenImageBackbone, TagMoEModule, distributed.parallelize)
under `torch._subclasses.fake_tensor.FakeTensorMode` at tiny sizes, then one full-width Qwen-Image block
(width 3072 = 24 × 128, MoE with 4 experts, 1024² image: 4096 target + 4096 reference tokens, 256 text
tokens, bf16 autocast). It prints one line per suspect:

    [probe] suspect | what happened | fallback for the planner   (seconds)

and, at the end, the same lines as a table. Nothing here changes the kit: fallbacks are applied by
monkeypatching inside a probe, only to see what breaks next. Findings: docs/plan_spike.md.

Usage: .venv/bin/python benchmarks/fake_cuda_spike.py [--skip-full]   (~1-2 min on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
import warnings
from functools import partial
from unittest import mock

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*(TypedStorage|torch.utils._pytree|Attempting to run cuBLAS).*")

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils.flop_counter import FlopCounterMode

from tagmoe_lit.moe import MoELayer
from tagmoe_lit.moe import layer as moe_layer_mod

ROWS: list[tuple[str, str, str, str, float]] = []
FULL = dict(heads=24, head_dim=128, rope=(16, 56, 56), experts=4, image=1024, text=256)


def short(e: BaseException) -> str:
    """'ExcType: first line [at the innermost kit / torch.distributed frame]'."""
    first = (str(e).strip().splitlines() or [""])[0]
    frames = traceback.extract_tb(e.__traceback__)
    kit = [f for f in frames if "tagmoe_lit" in f.filename or "torch/distributed" in f.filename]
    where = ""
    if kit:
        f = kit[-1]
        path = f.filename.split("site-packages/")[-1].split("/work/main/")[-1]
        where = f" [at {path}:{f.lineno} {f.name}]"
    return f"{type(e).__name__}: {first[:160]}{where}"


def report(probe: str, suspect: str, happened: str, fallback: str, t0: float) -> None:
    ROWS.append((probe, suspect, happened, fallback, time.perf_counter() - t0))
    print(f"[{probe}] {suspect} | {happened} | {fallback}   ({time.perf_counter() - t0:.2f} s)", flush=True)


def attempt(fn):
    """(True, result) or (False, 'ExcType: first line')."""
    try:
        return True, fn()
    except Exception as e:  # noqa: BLE001 - a spike reports every failure
        if os.environ.get("SPIKE_TRACE"):
            traceback.print_exc()
        return False, short(e)


# -- fallbacks the probes apply to get past one failure and see the next ---------------------------------
def static_bincount(idx: torch.Tensor, weights=None, minlength: int = 0) -> torch.Tensor:
    """bincount with a static [minlength] output (ids < minlength, as the MoE's expert ids are)."""
    return torch.zeros(minlength, dtype=torch.long, device=idx.device).index_add_(0, idx, torch.ones_like(idx))


@contextlib.contextmanager
def patched_bincount():
    with mock.patch.object(torch, "bincount", static_bincount):
        yield


@contextlib.contextmanager
def grouped_in_autocast_dtype():
    """Fallback for `StackedExperts.forward_grouped`: _grouped_mm is on no autocast list and its CUDA
    checks take bf16/fp16 only, so cast the tokens to the autocast dtype when autocast is on."""
    from tagmoe_lit.moe.experts import StackedExperts

    orig = StackedExperts.forward_grouped

    def cast(self, x_MD, counts_E):
        dev = x_MD.device.type
        if torch.is_autocast_enabled(dev) and x_MD.dtype == torch.float32:
            x_MD = x_MD.to(torch.get_autocast_dtype(dev))
        return orig(self, x_MD, counts_E)

    with mock.patch.object(StackedExperts, "forward_grouped", cast):
        yield


@contextlib.contextmanager
def moe_input_dtypes(seen: list):
    """Record the dtype of the tokens each MoE layer receives."""
    orig = MoELayer.forward

    def spy(self, x):
        seen.append(str(x.dtype).replace("torch.", ""))
        return orig(self, x)

    with mock.patch.object(MoELayer, "forward", spy):
        yield


@contextlib.contextmanager
def cuda_autocast_forced(dtype=torch.bfloat16):
    """`torch.autocast('cuda')` disables itself when CUDA is unavailable; set the dispatcher's flags directly."""
    prev, prev_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", prev)
        torch.set_autocast_dtype("cuda", prev_dtype)


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2·(rows)·(inner)·(cols) of one grouped GEMM: 2-D × 3-D (forward, dx) and 2-D × 2-D → 3-D (dW)."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:  # 3-D × 2-D → 2-D
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]  # batched 3-D × 3-D


def register_grouped_mm_flops() -> bool:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if torch.ops.aten._grouped_mm in flop_registry:
        return False
    register_flop_formula(torch.ops.aten._grouped_mm)(grouped_mm_flops)
    return True


def flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA through the flash kernel's own op (what a real H100 picks for bf16, no mask, head dim ≤ 256)."""
    q, k, v = query, key, value
    if attn_mask is not None:
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, True, dropout_p, is_causal,
                                                                       scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Names of the aten ops that run (to see which SDPA kernel a device picks)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args, kwargs=None):
        self.ops.append(str(func.overloadpacket).replace("aten.", ""))
        return func(*args, **(kwargs or {}))


def attention_ops(ops: list[str]) -> list[str]:
    return sorted({o for o in ops if "attention" in o or "softmax" in o or o == "bmm"})


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while `fn` runs (activation memory)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


# -- probe 1: the MoE layer -------------------------------------------------------------------------------
def probe_moe() -> None:
    D, H, E = 64, 256, 4

    def run(mode, device="cuda", dispatch="grouped", backward=True, dtype=torch.bfloat16):
        with mode:
            with torch.device(device):
                layer = MoELayer(D, H, num_experts=E, dispatch=dispatch, expert_bias=False)
            x = torch.randn(2, 16, D, device=device, dtype=dtype, requires_grad=True)
            y = layer(x)
            if backward:
                y.float().sum().backward()
            return y, layer

    t0 = time.perf_counter()
    ok, res = attempt(lambda: run(FakeTensorMode(), backward=False))
    report("1", "bincount, plain FakeTensorMode (fake cuda)", "works" if ok else res,
           "static-shape bincount: zeros(E).index_add_(0, idx, 1) (or FakeTensorMode(shape_env=ShapeEnv()))", t0)

    t0 = time.perf_counter()
    captured = {}
    orig = torch.bincount

    def spy(*a, **k):
        out = orig(*a, **k)
        captured["shape"] = tuple(out.shape)
        return out

    with mock.patch.object(torch, "bincount", spy):
        ok, res = attempt(lambda: run(FakeTensorMode(shape_env=ShapeEnv()), backward=False))
    report("1", "bincount with ShapeEnv (fake cuda, grouped forward)",
           f"works: counts shape {captured.get('shape')}, forward completes" if ok else res,
           "not needed if bincount is static; an unbacked size would reach .tolist() in `sorted` anyway", t0)

    t0 = time.perf_counter()
    with patched_bincount():
        ok, res = attempt(lambda: run(FakeTensorMode(), backward=False))
    detail = f"works: out {tuple(res[0].shape)} {res[0].dtype} on {res[0].device}, backend {res[1]._backend(res[0])}" if ok else res
    report("1", "torch._grouped_mm bf16 forward on fake cuda (static bincount)", detail, "none needed", t0)

    t0 = time.perf_counter()
    with patched_bincount():
        ok, res = attempt(lambda: run(FakeTensorMode(), backward=False, dispatch="sorted"))
    report("1", "`sorted` dispatch: counts_E.tolist() on fake cuda", "works" if ok else res,
           "plan the dispatch the config picks on CUDA (auto → grouped); `sorted` / `loop` are refused or planned "
           "with an assumed uniform split", t0)

    t0 = time.perf_counter()
    with patched_bincount():
        ok, res = attempt(lambda: run(FakeTensorMode(), backward=False, dispatch="loop"))
    report("1", "`loop` dispatch: torch.where(idx == e) on fake cuda", "works" if ok else res,
           "same as `sorted`: data-dependent per-expert sizes", t0)

    t0 = time.perf_counter()

    def mask_all():
        with FakeTensorMode():
            m = torch.ones(2, 8, dtype=torch.bool, device="cuda")
            return bool(m.all())

    ok, res = attempt(mask_all)
    report("1", "bool(text_mask.all()) (QwenImageBackbone.forward)", "works" if ok else res,
           "plan's text stub returns mask=None (unpadded, the fast path), or a padded mask → masked SDPA", t0)

    t0 = time.perf_counter()
    with patched_bincount():
        ok, res = attempt(lambda: run(FakeTensorMode(), backward=True))
    report("1", "MoE backward on fake cuda (any backward)", "works" if ok else res,
           "run the step on fake *cpu* tensors with CUDA's choices forced (dispatch grouped, bf16 autocast, "
           "SDPA kernel); forward-only checks stay on fake cuda", t0)

    t0 = time.perf_counter()
    with patched_bincount(), torch.autocast("cpu", dtype=torch.bfloat16):
        ok, res = attempt(lambda: run(FakeTensorMode(), device="cpu", dtype=torch.float32, backward=True))
    report("1", "MoE grouped fwd+bwd on fake cpu, fp32 input, cpu bf16 autocast",
           "works" if ok else res, "_grouped_mm is on no autocast list: the layer must cast its input (see full block)",
           t0)
    t0 = time.perf_counter()
    with patched_bincount(), torch.autocast("cpu", dtype=torch.bfloat16):
        ok, res = attempt(lambda: run(FakeTensorMode(), device="cpu", dtype=torch.bfloat16, backward=True))
    detail = (f"works: out {res[0].dtype}, w1 grad {tuple(res[1].experts.w1_EDH.grad.shape)} "
              f"{res[1].experts.w1_EDH.grad.dtype}") if ok else res
    report("1", "MoE grouped fwd+bwd on fake cpu, bf16 input, cpu bf16 autocast", detail, "the planner's execution device", t0)


# -- probe 2: autocast ------------------------------------------------------------------------------------
def probe_autocast() -> None:
    t0 = time.perf_counter()
    with FakeTensorMode():
        lin = nn.Linear(64, 64, device="cuda")
        x = torch.randn(4, 64, device="cuda")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                dt, on = lin(x).dtype, torch.is_autocast_enabled("cuda")
        with cuda_autocast_forced():
            forced = lin(x).dtype
            with torch.autocast("cuda", enabled=False):  # the router's own guard (moe/layer.py route)
                router = lin(x.float()).dtype
    warn = [str(w.message)[:60] for w in caught if "autocast" in str(w.message).lower()]
    report("2", "torch.autocast('cuda', bf16) on fake cuda", f"silently off: Linear → {dt}, enabled={on}, warning {warn}",
           f"set the dispatcher flags (torch.set_autocast_enabled/dtype('cuda') + nesting): Linear → {forced}, "
           f"router's autocast(enabled=False) → {router}; plan asserts a Linear output is bf16", t0)

    t0 = time.perf_counter()
    with FakeTensorMode(), torch.autocast("cpu", dtype=torch.bfloat16):
        lin = nn.Linear(64, 64)
        q = torch.randn(1, 2, 16, 32)
        out = (lin(torch.randn(4, 64)).dtype, F.scaled_dot_product_attention(q, q, q).dtype)
    report("2", "torch.autocast('cpu', bf16) on fake cpu", f"on: Linear → {out[0]}, SDPA → {out[1]}",
           "the fake-cpu step uses it (CPU and CUDA autocast op lists differ in details)", t0)


# -- probe 3: FLOPs and SDPA ------------------------------------------------------------------------------
def probe_flops_sdpa() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    M, K, N, E = 64, 32, 48, 4
    t0 = time.perf_counter()
    with FakeTensorMode():
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(E, K, N, device="cuda", dtype=torch.bfloat16)
        offs = torch.tensor([16, 32, 48, 64], device="cuda", dtype=torch.int32)
        with FlopCounterMode(display=False) as fc:
            torch._grouped_mm(a, b, offs=offs)
        before = fc.get_total_flops()
        registered = register_grouped_mm_flops()
        with FlopCounterMode(display=False) as fc:
            torch._grouped_mm(a, b, offs=offs)
        after = fc.get_total_flops()
    report("3", "FlopCounterMode on aten._grouped_mm", f"{before} FLOPs (closed form 2MKN = {2 * M * K * N})",
           f"register_flop_formula(aten._grouped_mm) (registered={registered}): {after} FLOPs", t0)

    t0 = time.perf_counter()
    with patched_bincount(), FakeTensorMode(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer = MoELayer(64, 256, num_experts=4, dispatch="grouped", expert_bias=False)
        x = torch.randn(2, 16, 64, dtype=torch.bfloat16, requires_grad=True)
        with FlopCounterMode(display=False) as fc:
            layer(x).float().sum().backward()
        counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    tokens, expert = 32, 2 * 64 * 256 * 2
    report("3", "MoE fwd+bwd FLOPs with the formula (fake cpu, bf16 input)",
           f"_grouped_mm {counts.get('aten._grouped_mm', 0)} (closed form 3·2 GEMMs·2DH·N = {3 * tokens * expert}), "
           f"router mm {counts.get('aten.mm', 0)}",
           "count expert FLOPs from the formula; test: plan FLOPs > 0 for experts and within 2 % of closed form", t0)

    B, Hh, S, Dh = 1, 24, 1024, 128
    flops_fwd = 4 * B * Hh * S * S * Dh
    with FakeTensorMode():
        q = torch.randn(B, Hh, S, Dh, device="cuda", dtype=torch.bfloat16)
        t0 = time.perf_counter()
        with OpLog() as log:
            F.scaled_dot_product_attention(q, q, q)
        report("3", "SDPA kernel picked on fake cuda (bf16, no mask)", f"{attention_ops(log.ops)} (math)",
               "call the flash / efficient op directly (below); H100 would pick flash", t0)
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH):
            t0 = time.perf_counter()

            def forced():
                with sdpa_kernel(backend), OpLog() as log:
                    F.scaled_dot_product_attention(q, q, q)
                return attention_ops(log.ops)

            ok, res = attempt(forced)
            report("3", f"sdpa_kernel({backend.name}) on fake cuda", f"works: {res}" if ok else res,
                   "—" if backend == SDPBackend.MATH else "cannot force it: route F.scaled_dot_product_attention to "
                   "aten._scaled_dot_product_flash_attention (efficient with a mask)", t0)
        t0 = time.perf_counter()
        for name, fn in (("flash op", lambda: flash_sdpa(q, q, q)), ("math", lambda: F.scaled_dot_product_attention(q, q, q)),
                         ("efficient op", lambda: flash_sdpa(q, q, q, attn_mask=torch.zeros(B, Hh, S, S, device="cuda",
                                                                                              dtype=torch.bfloat16)))):
            ok, res = attempt(lambda: fn())
            with FlopCounterMode(display=False) as fc:
                ok2, _ = attempt(fn)
            report("3", f"SDPA via {name} on fake cuda (S={S}, 24×128, bf16)",
                   (f"works: out {tuple(res.shape)}, FLOPs {fc.get_total_flops():.3g} (closed form 4BHS²D = {flops_fwd:.3g})"
                    if ok and ok2 else str(res)), "—", t0)
    # activation bytes saved by each kernel (fake cpu, since backward graphs need a non-cuda device)
    with FakeTensorMode():
        qc = torch.randn(B, Hh, S, Dh, dtype=torch.bfloat16, requires_grad=True)
        t0 = time.perf_counter()
        math_b = saved_bytes(lambda: F.scaled_dot_product_attention(qc, qc, qc))
        with OpLog() as log:
            F.scaled_dot_product_attention(qc, qc, qc)
        cpu_kernel = attention_ops(log.ops)
        flash_ok, flash_b = attempt(lambda: saved_bytes(lambda: flash_sdpa(qc, qc, qc)))
        with sdpa_kernel(SDPBackend.MATH):
            forced_math = saved_bytes(lambda: F.scaled_dot_product_attention(qc, qc, qc))
    with FakeTensorMode():
        qc2 = torch.randn(B, Hh, S, Dh, dtype=torch.bfloat16)
        with FlopCounterMode(display=False) as fc:
            F.scaled_dot_product_attention(qc2, qc2, qc2)
    report("3", "FlopCounterMode on the default SDPA of fake cpu", f"{fc.get_total_flops():.3g} FLOPs "
           f"(closed form {flops_fwd:.3g}; kernel {cpu_kernel})", "route SDPA to the cuda flash op on the fake-cpu path "
           "(counted), or add a formula for the cpu kernel", t0)
    t0 = time.perf_counter()
    report("3", "SDPA saved-for-backward bytes (fake cpu, S=1024)",
           f"default cpu kernel {cpu_kernel}: {math_b / 2**20:.1f} MiB; forced math: {forced_math / 2**20:.1f} MiB; "
           f"cuda flash op: {flash_b / 2**20:.1f} MiB" if flash_ok else f"flash op failed: {flash_b}",
           "plan activation memory with the kernel a real GPU picks (flash: O(S), math: O(S²))", t0)


# -- probe 4: FSDP2 on the fake process group -------------------------------------------------------------
def probe_fsdp2() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from tagmoe_lit.distributed.fsdp2 import parallelize

    W = 8
    t0 = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=W)
    report("4", f"init_process_group('fake', FakeStore, world {W})", f"works: world_size={dist.get_world_size()}", "—", t0)

    def tiny_blocks(device):
        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.ffn = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
                self.moe = MoELayer(64, 128, num_experts=4, dispatch="grouped", expert_bias=False)

            def forward(self, x):
                return x + self.moe(self.ffn(x))

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = nn.ModuleList([Block() for _ in range(2)])
                self.out = nn.Linear(64, 64)

            def forward(self, x):
                for b in self.blocks:
                    x = b(x)
                return self.out(x)

        with torch.device(device):
            return Net()

    # fake cuda
    t0 = time.perf_counter()
    ok, mesh = attempt(lambda: init_device_mesh("cuda", (W,)))
    report("4", "init_device_mesh('cuda', (8,)) on the fake pg", "works" if ok else mesh,
           "mesh on 'cpu' with the fake pg (parameters' bytes are device-independent)", t0)
    if ok:
        t0 = time.perf_counter()
        with patched_bincount(), FakeTensorMode(allow_non_fake_inputs=True):
            net = tiny_blocks("cuda")
            ok, res = attempt(lambda: parallelize(net, mesh, net.blocks, activation_checkpointing=True))
            report("4", "parallelize (fully_shard) on fake cuda", "works" if ok else res, "—", t0)
            if ok:
                t0 = time.perf_counter()
                x = torch.randn(2, 16, 64, device="cuda")
                ok, res = attempt(lambda: net(x))
                report("4", "FSDP2 forward on fake cuda (lazy init: streams/events)",
                       "works" if ok else res, "fake cpu mesh (no streams), or patch torch.cuda.Stream/Event", t0)
                if ok:
                    t0 = time.perf_counter()
                    ok, res = attempt(lambda: res.sum().backward())
                    report("4", "FSDP2 backward on fake cuda", "works" if ok else res, "fake cpu", t0)

    # fake cpu: the whole FSDP2 step plus torch's trackers
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed._tools.runtime_estimator import RuntimeEstimator

    t0 = time.perf_counter()
    cpu_mesh = init_device_mesh("cpu", (W,))
    with patched_bincount(), FakeTensorMode(allow_non_fake_inputs=True):
        net = tiny_blocks("cpu")
        n_params = sum(p.numel() for p in net.parameters())
        parallelize(net, cpu_mesh, net.blocks, activation_checkpointing=True)
        local = sum(p.to_local().numel() for p in net.parameters())
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=False)
        x = torch.randn(2, 16, 64)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = net(x)
            y.float().sum().backward()
            opt.step()
            opt.zero_grad()

        ok, res = attempt(step)
        report("4", "parallelize + fwd/bwd/AdamW step on fake cpu, fake pg world 8",
               f"works: {n_params} params, {local} on rank 0 (1/{n_params / max(local, 1):.2f})" if ok else res, "—", t0)

        t0 = time.perf_counter()

        def fsdp_tracker():
            tracker = FSDPMemTracker(net, opt)
            tracker.track_inputs((x,))
            with tracker:
                step()
            snap = tracker.get_tracker_snapshot("peak")
            return {str(d): {str(k): v for k, v in m.items() if v} for d, m in snap.items()}

        ok, res = attempt(fsdp_tracker)
        report("4", "FSDPMemTracker over that step", f"works: peak {res}" if ok else res,
               "per-rank memory from the tracker (cross-check with closed-form parameter bytes)", t0)

        t0 = time.perf_counter()

        def mem_tracker():
            tracker = MemTracker()
            tracker.track_external(net, opt)
            with tracker:
                step()
            return {str(d): m.get("Total", 0) for d, m in tracker.get_tracker_snapshot("peak").items()}

        ok, res = attempt(mem_tracker)
        report("4", "MemTracker over that step", f"works: peak Total {res}" if ok else res, "—", t0)

        for mode_type, gpu in (("operator-level-cost-model", None), ("operator-level-cost-model", "NVIDIA H100"),
                               ("operator-level-benchmark", None)):
            t0 = time.perf_counter()

            def estimate():
                est = RuntimeEstimator(gpu_type=gpu) if gpu else RuntimeEstimator()
                with est(estimate_mode_type=mode_type):
                    step()
                return est.total_runtime

            ok, res = attempt(estimate)
            report("4", f"RuntimeEstimator {mode_type}{' gpu_type=' + gpu if gpu else ''}",
                   f"works: {res:.3f} ms" if ok else res,
                   "step time from FLOPs / (peak × MFU) + bytes / bandwidth, closed form per op class", t0)
    dist.destroy_process_group()


# -- probe 5: the whole TagMoEModule, meta_init, under fake tensors -----------------------------------------
def probe_module() -> None:
    from tagmoe_lit.align import SumTagEmbedder
    from tagmoe_lit.backbone import QwenImageBackbone
    from tagmoe_lit.distributed.materialize import materialize_
    from tagmoe_lit.module import TagMoEModule
    from tagmoe_lit.objective import check_finite, flow_by_sigma_quartile

    def build():
        backbone = partial(QwenImageBackbone, num_layers=2, num_attention_heads=2, attention_head_dim=16,
                           axes_dims_rope=(4, 6, 6), moe=partial(MoELayer, num_experts=4, expert_bias=False), moe_blocks=2)
        module = TagMoEModule(backbone=backbone, tag_embedder=SumTagEmbedder, meta_init=True)
        module.configure_model()  # no trainer: stays on meta
        return module

    def batch(module, device, B=2, size=16):
        tags = torch.zeros(B, module.schema.num_tags, device=device)
        return {"instruction": [f"make the red circle blue {i}" for i in range(B)],
                "source": torch.rand(B, 3, size, size, device=device), "has_source": torch.arange(B, device=device) % 2 == 0,
                "target": torch.rand(B, 3, size, size, device=device), "tags": tags,
                "task": torch.arange(B, device=device) % 3, "index": torch.arange(B, device=device)}

    t0 = time.perf_counter()
    module = build()
    report("5", "configure_model with meta_init, no trainer", f"works: all meta = "
           f"{all(p.is_meta for p in module.parameters())}", "—", t0)

    t0 = time.perf_counter()
    with FakeTensorMode(allow_non_fake_inputs=True):
        ok, res = attempt(lambda: [materialize_(p, "cuda") for p in (module.backbone, module.tag_embedder, module.head)])
    report("5", "materialize_ (declared inits) onto fake cuda", "works" if ok else res,
           "plan materializes with to_empty(device) only (values are irrelevant to fake tensors)", t0)

    t0 = time.perf_counter()
    module = build()
    with FakeTensorMode(allow_non_fake_inputs=True):
        ok, res = attempt(lambda: [p.to_empty(device="cuda") for p in (module.backbone, module.tag_embedder, module.head)])
        dev = {str(p.device) for p in module.parameters()}
    report("5", "to_empty('cuda') of the meta build inside FakeTensorMode", f"works: devices {dev}" if ok else res,
           "— (a module built *inside* the mode cannot be _apply'd: 'Couldn't swap', fake tensors carry weakrefs)", t0)

    t0 = time.perf_counter()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        b = batch(module, "cuda")
        ok, fake_draws = attempt(lambda: module.training_draws(b["target"], 0))
        detail = (f"works, but the draws are fake ({type(fake_draws.drop_text_B).__name__})" if ok else fake_draws)
        if ok:
            from tagmoe_lit.objective import conditioning

            ok2, res2 = attempt(lambda: conditioning(b, torch.zeros(2, 64, 12, device="cuda"), fake_draws.drop_text_B,
                                                     fake_draws.drop_ref_B))
            detail += f"; objective.conditioning on them: {'works' if ok2 else res2}"
    report("5", "training_draws (CPU generators) inside the mode", detail,
           "draw σ/ε/dropouts outside the mode (real CPU tensors, tiny); fake CUDA tensors only for the network", t0)
    draws = module.training_draws(torch.zeros(2, 3, 16, 16), 0)  # real CPU draws, outside the mode

    t0 = time.perf_counter()
    with mode:
        ok, res = attempt(lambda: module.loss_terms(b, draws.sigma_B.to("cuda"), draws.noise_BTP.to("cuda"),
                                                    draws.drop_text_B, draws.drop_ref_B))
    report("5", "loss_terms with real draws, real MiniLM text encoder, fake cuda", "works" if ok else res,
           "text stub returning fake [B, L, D] features and mask=None; frozen encoders counted in closed form", t0)

    class TextStub(nn.Module):
        def __init__(self, dim, length):
            super().__init__()
            self.dim, self.length = dim, length

        def forward(self, instructions, device="cpu"):
            return torch.zeros(len(instructions), self.length, self.dim, device=device), None

    module.text_encoder = TextStub(module.text_encoder.dim, 12)
    t0 = time.perf_counter()
    with mode:
        ok, res = attempt(lambda: module.loss_terms(b, draws.sigma_B.to("cuda"), draws.noise_BTP.to("cuda"),
                                                    draws.drop_text_B, draws.drop_ref_B))
    report("5", "loss_terms with the text stub (kit's bincount)", "works" if ok else res, "static bincount", t0)

    t0 = time.perf_counter()
    with mode, patched_bincount(), cuda_autocast_forced():
        ok, terms = attempt(lambda: module.loss_terms(b, draws.sigma_B.to("cuda"), draws.noise_BTP.to("cuda"),
                                                      draws.drop_text_B, draws.drop_ref_B))
        detail = (f"works: terms {sorted(terms)}, loss {terms['loss'].dtype} on {terms['loss'].device}, "
                  f"dispatch {module.moe_layers[0]._backend(terms['loss'])}") if ok else terms
    report("5", "loss_terms: text stub + static bincount + forced cuda autocast", detail,
           "cast the MoE tokens to the autocast dtype before _grouped_mm (kit fix in moe/experts.py)", t0)
    t0 = time.perf_counter()
    seen: list = []
    with mode, patched_bincount(), cuda_autocast_forced(), grouped_in_autocast_dtype(), moe_input_dtypes(seen):
        ok, terms = attempt(lambda: module.loss_terms(b, draws.sigma_B.to("cuda"), draws.noise_BTP.to("cuda"),
                                                      draws.drop_text_B, draws.drop_ref_B))
        detail = (f"works: terms {sorted(terms)}, loss {terms['loss'].dtype} on {terms['loss'].device}, MoE input "
                  f"dtypes {seen}") if ok else terms
    report("5", "... + the cast fallback", detail, "—", t0)
    if ok:
        t0 = time.perf_counter()
        with mode:
            ok2, res = attempt(lambda: check_finite(terms, 0))
            ok3, res3 = attempt(lambda: flow_by_sigma_quartile(draws.sigma_B, terms["flow_per_sample"], "train/"))
        report("5", "training_step's check_finite / flow_by_sigma_quartile on fake", f"check_finite: "
               f"{'works' if ok2 else res}; quartiles: {'works' if ok3 else res3}",
               "plan calls loss_terms (not training_step) and skips logging/finite checks", t0)
        t0 = time.perf_counter()
        with mode:
            ok, res = attempt(lambda: terms["loss"].backward())
        report("5", "loss backward on fake cuda", "works" if ok else res, "fake cpu (probe 1)", t0)

    # the same module on fake cpu: the whole step
    t0 = time.perf_counter()
    module = build()
    module.text_encoder = TextStub(module.text_encoder.dim, 12)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, patched_bincount():
        for p in (module.backbone, module.tag_embedder, module.head):
            p.to_empty(device="cpu")
        module.backbone.rebuild_rope()
        for layer in module.moe_layers:
            layer.dispatch = "grouped"  # what `auto` picks on CUDA
        b = batch(module, "cpu")
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

        seen_cpu: list = []

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16), moe_input_dtypes(seen_cpu):
                terms = module.loss_terms(b, draws.sigma_B, draws.noise_BTP, draws.drop_text_B, draws.drop_ref_B)
            terms["loss"].backward()
            opt.step()
            return terms

        ok, res = attempt(step)
    report("5", "whole step (3 losses, backward, AdamW) on fake cpu, grouped, bf16 autocast",
           f"works: {sorted(res)}; MoE input dtypes {seen_cpu} (cpu autocast ≠ cuda autocast)" if ok else res,
           "the planner's path, with the dtype difference to cuda autocast handled (see docs/plan_spike.md)", t0)


# -- probe 6: graph task id (checkpoint recompute detection) ----------------------------------------------
def probe_graph_task() -> None:
    from torch.utils.checkpoint import checkpoint

    from tagmoe_lit.moe import expert_counts

    t0 = time.perf_counter()
    calls: list[bool] = []
    orig = expert_counts.in_backward

    def spy():
        calls.append(orig())
        return calls[-1]

    with patched_bincount(), mock.patch.object(expert_counts, "in_backward", spy), FakeTensorMode():
        layer = MoELayer(64, 128, num_experts=4, dispatch="grouped", expert_bias=False).train()
        x = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
        outside = torch._C._current_graph_task_id()
        ok, res = attempt(lambda: checkpoint(layer, x, use_reentrant=False).sum().backward())
    report("6", "_current_graph_task_id() under fake tensors + non-reentrant checkpoint (fake cpu)",
           f"{'works' if ok else res}: id outside backward {outside}; ExpertCounts.add saw in_backward = {calls} "
           "(forward False, recompute True)", "none needed: counts once per token on the fake path too", t0)


# -- full width: one Qwen-Image block with MoE, bf16 ------------------------------------------------------
def probe_full_block() -> None:
    from tagmoe_lit.backbone import QwenImageBackbone
    from tagmoe_lit.backbone.qwen_image import QWEN_IMAGE_IO

    register_grouped_mm_flops()
    grid = FULL["image"] // 16  # VAE /8, patch 2 → 64 × 64 tokens
    T, L, B = grid * grid, FULL["text"], 1

    with torch.device("meta"):
        meta = QwenImageBackbone(**QWEN_IMAGE_IO, num_layers=1, num_attention_heads=FULL["heads"],
                                 attention_head_dim=FULL["head_dim"], axes_dims_rope=FULL["rope"],
                                 moe=partial(MoELayer, num_experts=FULL["experts"], top_k=1, expert_bias=False),
                                 moe_blocks=1)
    n_params = sum(p.numel() for p in meta.parameters())
    block_params = sum(p.numel() for p in meta.blocks[0].parameters())

    def inputs(device):
        return (torch.randn(B, T, 64, device=device), torch.randn(B, T, 64, device=device), (grid, grid),
                torch.randn(B, L, QWEN_IMAGE_IO["text_dim"], device=device), None, torch.rand(B, device=device))

    # forward on fake cuda, bf16 (forced autocast), math SDPA (what fake cuda picks) vs flash op
    for sdpa_name, sdpa in (("default SDPA (math on fake cuda)", None), ("flash op", flash_sdpa)):
        t0 = time.perf_counter()
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        # build outside the mode (plain meta), materialize inside
        with torch.device("meta"):
            bb = QwenImageBackbone(**QWEN_IMAGE_IO, num_layers=1, num_attention_heads=FULL["heads"],
                                   attention_head_dim=FULL["head_dim"], axes_dims_rope=FULL["rope"],
                                   moe=partial(MoELayer, num_experts=FULL["experts"], top_k=1, expert_bias=False),
                                   moe_blocks=1)
        patch = mock.patch.object(F, "scaled_dot_product_attention", sdpa) if sdpa else contextlib.nullcontext()
        seen: list = []
        with mode, patched_bincount(), cuda_autocast_forced(), grouped_in_autocast_dtype(), moe_input_dtypes(seen), patch:
            bb.to_empty(device="cuda")
            bb.rebuild_rope()
            with FlopCounterMode(display=False) as fc:
                ok, res = attempt(lambda: bb(*inputs("cuda"))[0])
            flops = fc.get_flop_counts()["Global"]
            gmm = flops.get(torch.ops.aten._grouped_mm, 0) if ok else 0
        report("full", f"1 block W=3072 24×128 E=4, 1024² (T={T}+{T}, L={L}), fwd on fake cuda, {sdpa_name}",
               (f"works (cast fallback; MoE input {seen}): out {tuple(res.shape)} {res.dtype}; {n_params / 1e6:.0f} M params ({block_params / 1e6:.0f} M in "
                f"the block); fwd {fc.get_total_flops() / 1e12:.2f} TFLOP, experts {gmm / 1e12:.3f} TFLOP")
               if ok else res, "—", t0)

    # fwd + bwd on fake cpu, bf16 autocast, grouped, with the CUDA flash op vs the default cpu kernel
    S = 2 * T + L
    for sdpa_name, sdpa in (("cpu default SDPA", None), ("cuda flash op", flash_sdpa)):
        t0 = time.perf_counter()
        with torch.device("meta"):
            bb = QwenImageBackbone(**QWEN_IMAGE_IO, num_layers=1, num_attention_heads=FULL["heads"],
                                   attention_head_dim=FULL["head_dim"], axes_dims_rope=FULL["rope"],
                                   moe=partial(MoELayer, num_experts=FULL["experts"], top_k=1, expert_bias=False,
                                               dispatch="grouped"), moe_blocks=1)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        patch = mock.patch.object(F, "scaled_dot_product_attention", sdpa) if sdpa else contextlib.nullcontext()
        seen = []
        with mode, patched_bincount(), moe_input_dtypes(seen), patch:
            bb.to_empty(device="cpu")
            bb.rebuild_rope()
            args = inputs("cpu")
            with FlopCounterMode(display=False) as fc:
                def fwd_bwd():
                    params = {p.untyped_storage()._cdata for p in bb.parameters()}
                    storages: dict = {}

                    def pack(t):
                        st = t.untyped_storage()
                        if st._cdata not in params:
                            storages[st._cdata] = st.nbytes()
                        return t

                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            out = bb(*args)[0]
                    out.float().sum().backward()
                    return out, sum(storages.values())

                ok, res = attempt(fwd_bwd)
            gmm = fc.get_flop_counts()["Global"].get(torch.ops.aten._grouped_mm, 0)
        report("full", f"1 block fwd+bwd on fake cpu, bf16 autocast, grouped, {sdpa_name} (S={S})",
               (f"works: MoE input {seen}, out {res[0].dtype}; fwd+bwd {fc.get_total_flops() / 1e12:.2f} TFLOP, experts {gmm / 1e12:.3f} "
                f"TFLOP; saved-for-backward {res[1] / 2**30:.2f} GiB (distinct storages, parameters excluded)")
               if ok else res, "—", t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-full", action="store_true", help="skip the full-width block")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, threads {torch.get_num_threads()}")
    start = time.perf_counter()
    for probe in (probe_moe, probe_autocast, probe_flops_sdpa, probe_fsdp2, probe_module, probe_graph_task,
                  *(() if args.skip_full else (probe_full_block,))):
        t0 = time.perf_counter()
        ok, res = attempt(probe)
        if not ok:
            report(probe.__name__, "probe itself", f"crashed: {res}", "(fix the probe)", t0)
    print(f"\n== summary ({time.perf_counter() - start:.1f} s) ==")
    for probe, suspect, happened, fallback, dt in ROWS:
        print(f"| {probe} | {suspect} | {happened} | {fallback} | {dt:.2f} s |")


if __name__ == "__main__":
    sys.exit(main())
