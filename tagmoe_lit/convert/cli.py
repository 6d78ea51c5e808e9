"""`python -m tagmoe_lit convert {official,export}`: weights in and out of the kit.

    python -m tagmoe_lit convert official --src RELEASE_DIR --dst converted/
    python -m tagmoe_lit convert export --config experiments/base.yaml --ckpt_path last.ckpt --dst exported/

Both write a TAG-MoE transformer directory (`files.py`); errors end the command with one sentence.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from tagmoe_lit.convert.files import find_weights, read_state_dict, save_transformer_dir
from tagmoe_lit.convert.official import SCHEMA, OfficialInfo, from_official
from tagmoe_lit.convert.transformer import class_files
from tagmoe_lit.moe import LinearRouter
from tagmoe_lit.tags import TagSchema

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def official_config(info: OfficialInfo) -> dict[str, Any]:
    """`tagmoe_config.json` of a converted release: the MoELayer settings that reproduce dMoE's forward."""
    schema = TagSchema.load(SCHEMA) if info.tag_embedding else None
    return {
        "layout": "kit",
        "source": "ICTMCG/TAG-MoE release",
        "num_layers": info.num_layers,
        "moe_blocks": info.moe_blocks,
        "num_experts": info.num_experts,
        "top_k": 1,
        "router": f"{LinearRouter.__module__}.{LinearRouter.__qualname__}",
        "expert_bias": False,
        "renormalize": False,
        "zero_cond_t": False,  # the release modulates reference tokens with the target's noisy timestep
        "schema": schema.name if schema else None,
        "schema_fingerprint": schema.fingerprint if schema else None,
        "num_tags": schema.num_tags if schema else None,
        "components": ["backbone", *(["tag_embedder"] if info.tag_embedding else []), *(["head"] if info.head else [])],
        "release": info.to_dict(),
    }


def convert_official(
    src: str | Path, dst: str | Path, base: str | Path | None = None, max_shard_bytes: int = 10 * 2**30, overwrite: bool = False
) -> dict[str, Any]:
    """Release weights (file or folder) → a kit-layout directory; returns its tagmoe_config."""
    weights = find_weights(src)
    state, info = from_official(read_state_dict(weights), read_state_dict(base) if base else None)
    config = official_config(info)
    config_json = weights.parent / "config.json"  # diffusers' transformer config, from the release or the base
    if not config_json.is_file() and base:
        config_json = find_weights(base).parent / "config.json"
    diffusers_config = json.loads(config_json.read_text(encoding="utf-8")) if config_json.is_file() else None
    save_transformer_dir(dst, state, config, class_files(diffusers_config, config), max_shard_bytes, overwrite)
    return config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tagmoe_lit convert", description="Convert TAG-MoE weights into and out of the kit.")
    sub = p.add_subparsers(dest="command", required=True)
    official = sub.add_parser(
        "official",
        help="the official release (ICTMCG/TAG-MoE) → a kit-layout directory",
        description="Convert the official TAG-MoE release's transformer (MegaBlocks dMoE in its last blocks) into "
        "a directory that tagmoe_lit.convert.load_transformer_dir loads into a TagMoEModule.",
    )
    official.add_argument("--src", required=True, help="release weights: a .safetensors/.pt/.bin file, or a folder (or its transformer/) with one, or with shards and an index json")
    official.add_argument("--base", help="dense Qwen-Image transformer weights for dense keys the release does not hold")
    export = sub.add_parser(
        "export",
        help="a kit checkpoint → a diffusers-style transformer directory",
        description="Export a checkpoint's transformer, tag embedder and head as a diffusers save_pretrained-style "
        "directory. Other arguments are config options as for `test` (--config …): the model is built from them.",
    )
    export.add_argument("--ckpt_path", required=True, help="a Lightning .ckpt written by `fit`, or a `convert official` directory")
    export.add_argument("--layout", choices=["kit", "official"], default="kit", help="key names: the kit's (any model) or the release's dMoE ones (default: kit)")
    export.add_argument("--dtype", choices=list(DTYPES), help="cast floating-point weights (default: as stored)")
    lora = export.add_mutually_exclusive_group()
    lora.add_argument("--merge_lora", action="store_true", help="fold a LoRA model's adapters into its weights (a plain model)")
    lora.add_argument("--adapter_only", action="store_true",
                      help="write only a LoRA model's adapters, in peft's format (adapter_model.safetensors + adapter_config.json)")
    for command in (official, export):
        command.add_argument("--dst", required=True, help="output directory (must be new or empty unless --overwrite)")
        command.add_argument("--max_shard_gb", type=float, default=10.0, help="split weights into safetensors shards of at most this size (default: 10)")
        command.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args, rest = p.parse_known_args(argv)
    shard = int(args.max_shard_gb * 2**30)
    if args.command == "official" and rest:
        p.error(f"convert official does not take {' '.join(rest)}")
    try:
        if args.command == "official":
            config = convert_official(args.src, args.dst, args.base, shard, args.overwrite)
            release = config["release"]
            print(
                f"Converted {release['num_experts']}-expert MoE in blocks {release['moe_blocks']} of {release['num_layers']} "
                f"(components: {', '.join(config['components'])}; dropped {len(release['dropped'])} expert biases the release's "
                f"forward ignores) into {args.dst}"
            )
            return config
        from tagmoe_lit.cli import one_cpu_cli
        from tagmoe_lit.convert.export import export, export_adapter, load_checkpoint, merge_lora

        cli = one_cpu_cli(rest)
        kept = load_checkpoint(cli.model, args.ckpt_path)
        if args.adapter_only:
            files = export_adapter(cli.model, args.dst, args.overwrite)
            print(f"Exported the LoRA adapters of {args.ckpt_path} to {args.dst}: {', '.join(files)}")
            return {"files": files}
        if args.merge_lora:
            merge_lora(cli.model)
        files = export(cli.model, args.dst, args.layout, DTYPES.get(args.dtype), shard, args.overwrite)
        note = f" ({', '.join(kept)} not in the checkpoint: written as built)" if kept else ""
        print(f"Exported {args.ckpt_path} in the {args.layout} layout to {args.dst}: {', '.join(files)}{note}")
        return {"files": files, "not_in_checkpoint": kept}
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"convert {args.command}: {e}") from e
