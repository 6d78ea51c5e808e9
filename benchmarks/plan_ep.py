"""Does expert parallelism pay at full size? `plan` rows with and without EP for E = 4 and E = 16.

    python benchmarks/plan_ep.py [--ranks 8 16] [--out plan_ep.json]

Each row is one `python -m tagmoe_lit plan` of `model/qwen_image.yaml` + `strategy/fsdp2.yaml`
(micro-batch 1, 1024², bf16-mixed, activation checkpointing, AdamW), rank 0, with the experts of
every MoE layer split over `ep` consecutive ranks (`expert_parallel_size`) or not. Fake tensors plan
with perfectly balanced routing (`plan/fake.py`). Prints the README's Markdown rows; ~5 min a row
on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tagmoe_lit.plan.cli import GIB, plan

FULL = ["--config", "experiments/base.yaml", "--config", "experiments/model/qwen_image.yaml",
        "--config", "experiments/strategy/fsdp2.yaml"]


def row(ranks: int, experts: int, ep: int) -> dict:
    args = [*FULL, "--model.backbone.init_args.moe.init_args.num_experts", str(experts),
            "--trainer.strategy.init_args.expert_parallel_size", str(ep)]
    p = plan(args, world_size=ranks, micro_batch=1, image_hw=(1024, 1024))
    mem, col = p["memory_bytes"], p["collective_bytes"]
    step = next(iter(p["step_seconds"].values()))
    return {"ranks": ranks, "experts": experts, "ep": ep,
            "parameters": mem["parameters"] / GIB, "static": (mem["parameters"] + mem["gradients"] + mem["optimizer_state"]) / GIB,
            "unsharded_param_at_peak": mem["peak_by_kind"].get("Unsharded Param", 0) / GIB,
            "peak": mem["peak"] / GIB, "tflop": p["flops"]["measured"] / 1e12,
            "gather_scatter": (col["all_gather_buffers"] + col["reduce_scatter_buffers"]) / GIB,
            "tokens_sent": col["tokens_sent_per_rank"] / GIB, "sent": col["sent_per_rank"] / GIB,
            "network": col["sent_over_network"] / GIB, "compute_s": step["compute_s"], "comm_s": step["comm_s"],
            "overlapped_s": step["overlapped_s"]}


def markdown(r: dict) -> str:
    setting = f"E = {r['experts']}, " + (f"EP over {r['ep']} ranks" if r["ep"] > 1 else "no EP")
    return (f"| {r['ranks']} | {setting} | {r['parameters']:.2f} | {r['static']:.1f} | {r['unsharded_param_at_peak']:.2f} | "
            f"{r['peak']:.0f} | {r['tflop']:.0f} | {r['gather_scatter']:.0f} | {r['tokens_sent']:.2f} | "
            f"{r['sent']:.0f} / {r['network']:.0f} | {r['compute_s']:.2f} compute, {r['comm_s']:.2f} collectives, "
            f"{r['overlapped_s']:.2f} step |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    rows = []
    for ranks in args.ranks:
        for experts, ep in ((4, 1), (4, 4), (16, 1), (16, 8)):
            rows.append(row(ranks, experts, ep))
            print(markdown(rows[-1]), flush=True)
            if args.out:
                args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
