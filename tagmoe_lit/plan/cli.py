"""`python -m tagmoe_lit plan --config …`: one training step's per-rank cost, planned without a GPU.

    python -m tagmoe_lit plan --config experiments/base.yaml --trainer.precision bf16-mixed
    python -m tagmoe_lit plan --config experiments/base.yaml --config experiments/model/qwen_image.yaml \
        --config experiments/strategy/fsdp2.yaml --world_size 8 --micro_batch 1 --image_size 1024 1024

The configured model runs one whole step (all three losses, backward, optimizer step, activation
checkpointing as the strategy says) on fake tensors over a fake process group (`step.py`,
`fake.py`). It prints rank 0's memory by kind, the step's FLOPs, FSDP2's collective bytes, the
host RAM that starting weights and consolidation need, and step times on an H100 / H200 at a
stated MFU. Every measured figure that has a closed form (`closed_form.py`) is printed beside it,
and a plan that silently ran fp32, another dispatch or uncounted experts is refused.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from tagmoe_lit.plan.closed_form import HBM, optimizer_state_bytes, ring_bytes, sharded_bytes, step_flops, step_seconds
from tagmoe_lit.plan.step import Measured, PlanError, Setup, run_step, setup, shapes

GIB = 2**30


def plan(config_args: list[str], world_size: int | None = None, micro_batch: int | None = None,
         image_hw: tuple[int, int] | None = None, text_tokens: int = 256, mfu: float = 0.4) -> dict[str, Any]:
    """The plan of one step as plain data (what `--json` prints)."""
    s = setup(config_args, world_size, micro_batch, image_hw, text_tokens)
    measured = run_step(s)
    guard(s, measured)
    return summarize(s, measured, mfu)


def guard(s: Setup, m: Measured) -> None:
    """Refuse a plan whose step did not run as the GPU step would."""
    problems = []
    half = s.precision.startswith(("bf16", "16"))
    if half and any(d == "float32" for d in m.moe_dtypes):
        problems.append(f"the MoE layers received {m.moe_dtypes} tokens under {s.precision} (autocast did not apply)")
    if s.module.moe_layers and m.expert_flops == 0:
        problems.append("the experts counted 0 FLOPs (the grouped GEMM was not counted)")
    if m.attention_ops and not any("flash" in op or "efficient" in op for op in m.attention_ops):
        problems.append(f"attention ran {m.attention_ops}, not CUDA's flash / memory-efficient kernel")
    if problems:
        raise PlanError("The planned step is not the GPU step: " + "; ".join(problems) + ".")


def summarize(s: Setup, m: Measured, mfu: float) -> dict[str, Any]:
    W = s.shards  # how many ranks a parameter is split over (a node's under hybrid_shard)
    sh = shapes(s)
    closed = step_flops(sh) if s.module.trainable == "all" else {}  # the closed form assumes everything learns
    tracked = m.tracked  # what the memory tracker covers (under FSDP2: the backbone, its root)
    trainable = [p for p in tracked if p.requires_grad]
    optimized = trainable + m.untracked  # the tracker sees the optimizer's states of every parameter
    ep, experts = s.expert_parallel, frozenset(id(p) for layer in s.module.moe_layers for p in layer.experts.parameters())
    states = optimizer_state_bytes(s.optimizer, optimized, W, ep, experts)
    measured_states = _kind(m.after_step, "Optstate")
    peak = m.peak.get("Total", 0)
    if m.optimizer_stand_in:  # its states never existed on fake tensors: add the closed form at the peak
        measured_states, peak = states, peak + states
    total_params = sum(p.numel() for p in s.module.parameters())
    backbone_params = sum(p.numel() for p in s.module.backbone.parameters())
    all_gather, reduce_scatter, all_reduce = sum(m.all_gather_bytes), sum(m.reduce_scatter_bytes), sum(m.all_reduce_bytes)
    calls = zip([*m.all_gather_bytes, *m.reduce_scatter_bytes], [*m.all_gather_ranks, *m.reduce_scatter_ranks])
    sharding = sum(ring_bytes(b, n) for b, n in calls)  # inside each call's shard group (the experts': W / ep ranks)
    replicas = ring_bytes(all_reduce, s.world_size // W, all_reduce=True)  # HSDP: across nodes
    across = sharding if W > s.per_node else 0.0  # a shard group wider than a node crosses the network
    tokens = sum(m.all_to_all_bytes) * (ep - 1) / ep  # balanced: 1/ep of each exchange stays on the rank
    tokens_across = tokens if s.per_node % ep else 0.0  # an ep group is ep consecutive ranks: inside a node if they fit
    nvlink, network = sharding - across + tokens - tokens_across, across + replicas + tokens_across
    memory = {k: v for k, v in m.peak.items() if k != "Total"}
    return {
        "config": {"world_size": s.world_size, "shards": W, "hybrid_shard": s.hybrid, "expert_parallel_size": ep,
                   "micro_batch": s.micro_batch, "image_hw": list(s.image_hw),
                   "text_tokens": s.text_tokens, "precision": s.precision, "optimizer": s.optimizer,
                   "activation_checkpointing": sh.checkpointing, "shapes": asdict(sh)},
        "parameter_count": {"backbone": backbone_params, "alignment": total_params - backbone_params},
        "memory_bytes": {
            "parameters": _kind(m.after_step, "Param"), "gradients": _kind(m.after_step, "Grad"),
            "optimizer_state": measured_states, "peak_by_kind": memory, "peak": peak,
            "saved_for_backward": m.forward_end.get("Activation", 0),
            "frozen_encoders": dict(s.frozen), "peak_with_encoders": peak + sum(s.frozen.values()),
        },
        "closed_form_bytes": {
            "parameters": sharded_bytes(tracked, W, 4, ep, experts),
            "gradients": sharded_bytes(trainable, W, 4, ep, experts),
            "optimizer_state": states,
        },
        "untracked_bytes": sharded_bytes(m.untracked, W, 4 + 4),  # their parameters and gradients
        "flops": {"measured": m.flops, "closed_form": closed.get("total"), "experts": m.expert_flops, **closed},
        "collective_bytes": {"all_gather_buffers": all_gather, "reduce_scatter_buffers": reduce_scatter,
                             "all_reduce_buffers": all_reduce, "all_to_all_buffers": sum(m.all_to_all_bytes),
                             "calls": [len(m.all_gather_bytes), len(m.reduce_scatter_bytes), len(m.all_reduce_bytes),
                                       len(m.all_to_all_bytes)],
                             "sent_per_rank": nvlink + network, "sent_over_network": network, "tokens_sent_per_rank": tokens},
        "host_ram_bytes": {
            "start_from_weights": total_params * 2,  # rank 0 reads the bf16 release once, then broadcasts
            "consolidation": total_params * 4 + (optimizer_state_bytes(s.optimizer, optimized, 1) or 0),  # all shards gathered
        },
        "step_seconds": {f"{gpu} at MFU {mfu}": step_seconds(m.flops, mfu, nvlink, network, tokens - tokens_across, tokens_across)
                         for gpu in HBM},
        "fits": {gpu: peak + sum(s.frozen.values()) <= hbm * 0.95 for gpu, hbm in HBM.items()},
        "checks": {"moe_input_dtypes": sorted(set(m.moe_dtypes)), "attention": m.attention_ops,
                   "optimizer_states": "closed form (cannot run on fake tensors)" if m.optimizer_stand_in else "measured"},
    }


def _kind(snapshot: dict[str, int], word: str) -> int:
    """Bytes of the tracker categories whose name holds `word` (FSDP's sharded + unsharded, or MemTracker's one)."""
    names = {"Param": ("Parameter", "Sharded Param"), "Grad": ("Gradient", "Sharded Grad"), "Optstate": ("Optstate", "OptState")}
    return sum(snapshot.get(k, 0) for k in names[word])


def table(p: dict[str, Any]) -> str:
    """The plan as Markdown: rank 0's memory, then FLOPs, collectives, host RAM and step times."""
    c, mem, cf, fl = p["config"], p["memory_bytes"], p["closed_form_bytes"], p["flops"]
    unit, scale = ("GiB", GIB) if mem["peak_with_encoders"] >= GIB else ("MiB", 2**20)
    g = lambda b: "–" if b is None else f"{b / scale:.3f}"  # noqa: E731
    lines = [
        f"plan: {c['world_size']} rank(s){' (HSDP: shards of ' + str(c['shards']) + ')' if c['hybrid_shard'] else ''}"
        f"{', experts split over ' + str(c['expert_parallel_size']) + ' ranks (EP)' if c['expert_parallel_size'] > 1 else ''}, micro-batch {c['micro_batch']}, {c['image_hw'][0]}×{c['image_hw'][1]} px, "
        f"{c['text_tokens']} text tokens, {c['precision']}, {c['optimizer']}, "
        f"activation checkpointing {'on' if c['activation_checkpointing'] else 'off'}",
        "",
        f"| rank 0 memory | {unit} | closed form |", "|---|---|---|",
        f"| parameters | {g(mem['parameters'])} | {g(cf['parameters'])} |",
        f"| gradients | {g(mem['gradients'])} | {g(cf['gradients'])} |",
        f"| optimizer state ({p['checks']['optimizer_states']}) | {g(mem['optimizer_state'])} | {g(cf['optimizer_state'])} |",
        f"| activations saved for backward (end of forward) | {g(mem['saved_for_backward'])} | |",
        *[f"| at peak: {k} | {g(v)} | |" for k, v in mem["peak_by_kind"].items()],
        f"| **peak of the training step** | **{g(mem['peak'])}** | |",
        *[f"| + frozen {k} (a whole copy on every rank) | | {g(v)} |" for k, v in mem["frozen_encoders"].items() if v],
        f"| **peak total, with the frozen encoders** | **{g(mem['peak_with_encoders'])}** | |",
        *([f"| + tag embedder and head: parameters, gradients (own FSDP roots, not tracked) | | {g(p['untracked_bytes'])} |"]
          if p["untracked_bytes"] else []),
        "",
        f"FLOPs per step and rank: {fl['measured']:.4g} (closed form "
        f"{'n/a: not everything learns' if fl['closed_form'] is None else format(fl['closed_form'], '.4g')}; experts {fl['experts']:.4g})",
        f"collectives per step: all-gather buffers {g(p['collective_bytes']['all_gather_buffers'])} {unit}, reduce-scatter "
        f"{g(p['collective_bytes']['reduce_scatter_buffers'])} {unit}, all-reduce {g(p['collective_bytes']['all_reduce_buffers'])} "
        f"{unit}, all-to-all (EP tokens) {g(p['collective_bytes']['all_to_all_buffers'])} {unit}; "
        f"sent per rank {g(p['collective_bytes']['sent_per_rank'])} {unit}, "
        f"{g(p['collective_bytes']['sent_over_network'])} of it between nodes",
        f"host RAM: start from weights (rank 0) {g(p['host_ram_bytes']['start_from_weights'])} {unit}, "
        f"consolidation {g(p['host_ram_bytes']['consolidation'])} {unit}",
    ]
    static = mem["parameters"] + mem["gradients"] + mem["optimizer_state"]
    bound = ", an upper bound under activation checkpointing (docs/plan.md)" if c["activation_checkpointing"] else ""
    for gpu, t in p["step_seconds"].items():
        name = gpu.split()[0]
        fits = "fits" if p["fits"][name] else "does NOT fit"
        lines.append(f"{gpu}: compute {t['compute_s']:.4g} s, collectives {t['comm_s']:.4g} s, step "
                     f"{t['overlapped_s']:.4g} s overlapped / {t['serial_s']:.4g} s serial; the peak{bound} {fits}")
        if static > 0.95 * HBM[name]:
            lines.append(f"  {name}: parameters, gradients and optimizer states alone take {static / GIB:.1f} GiB of "
                         f"{HBM[name] / GIB:.0f} GiB: shard over more ranks, train `moe_tail`, or use 8-bit AdamW.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m tagmoe_lit plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="kit YAML (repeat to compose, as for fit)")
    parser.add_argument("--world_size", type=int, help="ranks (default: trainer.devices × num_nodes)")
    parser.add_argument("--micro_batch", type=int, help="samples per rank and step (default: the data's batch_size)")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"), help="default: the data's image size")
    parser.add_argument("--text_tokens", type=int, default=256, help="unpadded instruction tokens per sample (256)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization for the step time (0.4)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, overrides = parser.parse_known_args(argv)
    config_args = [a for c in args.config for a in ("--config", c)] + overrides
    result = plan(config_args, args.world_size, args.micro_batch, tuple(args.image_size) if args.image_size else None,
                  args.text_tokens, args.mfu)
    print(json.dumps(result, indent=1) if args.json else table(result))
    return result
