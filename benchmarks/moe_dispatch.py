"""MoE layer forward+backward time relative to a dense FFN with the same active FLOPs.

For E = 4 experts, top-1, each expert the size of the dense FFN (D → 4D → D, GELU tanh), at
1024 / 4096 / 16384 tokens and width 256 / 512, under a uniform and a skewed (70/10/10/10)
routing, per dispatch backend. MoE and dense runs alternate in one process; each figure is the
median of `--repeats` runs with its interquartile range. Two floors, both without any routing
(see `SplitDense`): `split` runs the one dense FFN on the experts' row slices (the cost of smaller
GEMMs alone), `floor` runs E distinct FFNs on them (smaller GEMMs plus E× the weights and weight
gradients to stream: what any dropless MoE with these experts must pay). `moe/floor` is then what
routing, sorting and combining cost. Tokens dropped are counted from the
layer's own statistics (assignments processed vs tokens × K) and must be 0. Targets (2 CPU cores,
fp32): `sorted` ≤ 1.15 at 1024 tokens and ≤ 1.05 at 4096 and 16384.

Usage: python benchmarks/moe_dispatch.py [--repeats 7] [--dtype float32|bfloat16] [--device cpu|cuda]
       [--widths 256 512] [--tokens 1024 4096 16384] [--backends sorted grouped loop]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from torch import nn

from tagmoe_lit.moe import MoELayer

TARGETS = {1024: 1.15, 4096: 1.05, 16384: 1.05}  # for the sorted backend on CPU
SHARES = {"uniform": (0.25, 0.25, 0.25, 0.25), "skewed": (0.7, 0.1, 0.1, 0.1)}


class FixedShareRouter(nn.Module):
    """A linear gate plus fixed per-token offsets that make top-1 shares exactly `shares`."""

    def __init__(self, dim: int, num_experts: int, shares: tuple[float, ...] = SHARES["uniform"], tokens: int = 1024):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=1e-4)
        sizes = [round(s * tokens) for s in shares]
        sizes[0] += tokens - sum(sizes)
        assign = torch.repeat_interleave(torch.arange(num_experts), torch.tensor(sizes))
        assign = assign[torch.randperm(tokens, generator=torch.Generator().manual_seed(0))]
        self.register_buffer("offsets", nn.functional.one_hot(assign, num_experts).float() * 10.0)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.gate(x_ND) + self.offsets


def dense_ffn(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))


class SplitDense(nn.Module):
    """FFNs run on the same row slices the experts get, with no routing at all. With one shared FFN
    (`distinct=False`) it shows the cost of smaller GEMMs alone; with one FFN per slice it is the
    floor of a dropless MoE, whose experts' weights and weight gradients are E× the dense FFN's."""

    def __init__(self, dim: int, sizes: list[int], distinct: bool):
        super().__init__()
        ffn = dense_ffn(dim)
        self.ffns = nn.ModuleList([dense_ffn(dim) if distinct else ffn for _ in sizes])
        self.sizes = sizes

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        return torch.cat([f(part) for f, part in zip(self.ffns, x_BND.split(self.sizes, dim=1))], dim=1)


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, iters: int = 1) -> float:
    """Seconds per forward+backward, averaged over `iters` back-to-back runs."""
    if x.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        module(x).backward(grad)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, med, q3 = statistics.quantiles(values, n=4)
    return q1, med, q3


def measure(dim: int, tokens: int, routing: str, backend: str, repeats: int, dtype: torch.dtype, device: str) -> dict:
    torch.manual_seed(0)
    router = partial(FixedShareRouter, shares=SHARES[routing], tokens=tokens)
    moe = MoELayer(dim, 4 * dim, num_experts=4, top_k=1, router=router, dispatch=backend).to(device, dtype)
    dense = dense_ffn(dim).to(device, dtype)
    # the FFN's input is an activation inside a block, so every variant computes its gradient too
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    for _ in range(2):  # warm-up
        fwd_bwd(moe, x, grad), fwd_bwd(dense, x, grad)
    iters = max(1, round(0.15 / fwd_bwd(dense, x, grad)))  # ≥ ~0.15 s per timed block: less jitter
    sizes = moe.routing.counts_E.long().tolist()
    split, floor = (SplitDense(dim, sizes, distinct).to(device, dtype) for distinct in (False, True))
    for _ in range(2):
        fwd_bwd(split, x, grad), fwd_bwd(floor, x, grad)
    times: dict[str, list[float]] = {"moe": [], "dense": [], "split": [], "floor": []}
    for _ in range(repeats):
        for name, module in (("moe", moe), ("dense", dense), ("split", split), ("floor", floor)):
            times[name].append(fwd_bwd(module, x, grad, iters))

    def ratio(a: str, b: str) -> list[float]:
        """Per repeat, so each ratio compares runs that were neighbours in time."""
        return [ta / tb for ta, tb in zip(times[a], times[b])]

    dropped = tokens * moe.top_k - int(moe.routing.counts_E.sum())
    return {"ratio": quartiles(ratio("moe", "dense")), "split": statistics.median(ratio("split", "dense")),
            "floor": statistics.median(ratio("floor", "dense")), "over_floor": statistics.median(ratio("moe", "floor")),
            "moe_ms": statistics.median(times["moe"]) * 1e3, "dense_ms": statistics.median(times["dense"]) * 1e3,
            "dropped": dropped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--backends", nargs="+", default=["sorted", "grouped", "loop"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"MoE (E=4, top-1) fwd+bwd / dense FFN, {args.dtype} on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} [IQR]")
    print(f"{'width':>5} {'tokens':>6} {'routing':>8} {'backend':>8} {'ratio':>6} {'IQR':>15} {'split':>6} "
          f"{'floor':>6} {'moe/floor':>9} {'moe ms':>8} {'dense ms':>8} {'dropped':>7}  target")
    failures = 0
    for dim in args.widths:
        for tokens in args.tokens:
            for routing in SHARES:
                for backend in args.backends:
                    r = measure(dim, tokens, routing, backend, args.repeats, dtype, args.device)
                    q1, med, q3 = r["ratio"]
                    verdict = ""
                    if backend == "sorted" and args.device == "cpu" and args.dtype == "float32" and tokens in TARGETS:
                        ok = med <= TARGETS[tokens] and r["dropped"] == 0
                        failures += not ok
                        verdict = f"{'PASS' if ok else 'FAIL'} (≤ {TARGETS[tokens]:.2f})"
                    print(f"{dim:>5} {tokens:>6} {routing:>8} {backend:>8} {med:>6.3f} [{q1:.3f}, {q3:.3f}] "
                          f"{r['split']:>6.3f} {r['floor']:>6.3f} {r['over_floor']:>9.3f} {r['moe_ms']:>8.1f} {r['dense_ms']:>8.1f} {r['dropped']:>7}  {verdict}", flush=True)
    print(f"{failures} target(s) missed")


if __name__ == "__main__":
    main()
