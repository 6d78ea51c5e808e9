"""`python -m tagmoe_lit params`: total vs active parameters of the MM-DiT, built on the meta device.

Without `--config` it prints the released Qwen-Image size (60 blocks, width 3072, text width
3584, 64 → 16 channels) dense and with TAG-MoE (the last `--moe-blocks` image FFNs as
`--experts`-expert top-`--top-k` MoE layers without expert biases, as the official release).
With `--config` (kit YAMLs, composed as for `fit`) it prints that config's backbone. Nothing is
allocated and no weights are read (a `pretrained_path` contributes its config only), so the full
20 B model counts in about a second. Only the backbone is counted in total and active: the tag
embedder and the prediction head are training-only and tiny; `trainable` counts every parameter
that learns under the config (`trainable: moe_tail`, LoRA adapters), those two included.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from tagmoe_lit.backbone.qwen_image import QWEN_IMAGE_IO, QWEN_IMAGE_SIZES, QwenImageBackbone
from tagmoe_lit.moe.parameter_counts import parameter_counts
from tagmoe_lit.moe.layer import MoELayer


def qwen_image_counts(moe_blocks: int = 10, num_experts: int = 4, top_k: int = 1) -> dict[str, dict]:
    """`parameter_counts` of the full Qwen-Image MM-DiT, dense and with TAG-MoE, keyed by row name."""
    moe = partial(MoELayer, num_experts=num_experts, top_k=top_k, expert_bias=False)
    with torch.device("meta"):
        dense = QwenImageBackbone(**QWEN_IMAGE_IO, **QWEN_IMAGE_SIZES)
        tagmoe = QwenImageBackbone(**QWEN_IMAGE_IO, **QWEN_IMAGE_SIZES, moe=moe, moe_blocks=moe_blocks)
    name = f"TAG-MoE ({moe_blocks} MoE blocks, {num_experts} experts, top-{top_k})"
    return {"Qwen-Image dense": parameter_counts(dense), name: parameter_counts(tagmoe)}


def config_counts(config_args: list[str]) -> dict:
    """`parameter_counts` of the backbone a kit config builds (on the meta device)."""
    from tagmoe_lit.cli import TagMoECLI

    cli = TagMoECLI(args=config_args, run=False)
    model = cli.model
    with torch.device("meta"):
        model.configure_model()
    counts = parameter_counts(model.backbone)
    outside = sum(p.numel() for part in (model.tag_embedder, model.head) if part is not None for p in part.parameters() if p.requires_grad)
    return {**counts, "trainable": counts["trainable"] + outside, "trainable_outside_backbone": outside}


def _billions(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f} B)"


def table(rows: dict[str, dict]) -> str:
    """A Markdown table: total and per-token active parameters, and what one MoE layer holds."""
    lines = ["| model | total | active per token | trainable | MoE layers | one MoE layer: total / active |", "|---|---|---|---|---|---|"]
    for name, c in rows.items():
        layer = f"{c['layers'][0]['total']:,} / {c['layers'][0]['active']:,}" if c["layers"] else "–"
        lines.append(f"| {name} | {_billions(c['total'])} | {_billions(c['active'])} | {_billions(c['trainable'])} | "
                     f"{len(c['layers'])} | {layer} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(prog="python -m tagmoe_lit params", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=[], help="kit YAML (repeat to compose); default: full Qwen-Image")
    p.add_argument("--moe-blocks", type=int, default=10, help="full-size table: MoE in the last N blocks (TAG-MoE: 10)")
    p.add_argument("--experts", type=int, default=4, help="full-size table: experts per MoE layer (TAG-MoE: 4)")
    p.add_argument("--top-k", type=int, default=1, help="full-size table: experts per token (TAG-MoE: 1)")
    args, overrides = p.parse_known_args(argv)
    if overrides and not args.config:
        p.error(f"unrecognized arguments {overrides}: config overrides need at least one --config")
    if args.config:
        rows = {" + ".join(args.config): config_counts([a for c in args.config for a in ("--config", c)] + overrides)}
    else:
        rows = qwen_image_counts(args.moe_blocks, args.experts, args.top_k)
    print(table(rows))
    return rows
