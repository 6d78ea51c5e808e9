"""`python -m tagmoe_lit edit`: edit one image with a checkpoint, and write what the router thought.

    python -m tagmoe_lit edit --config experiments/base.yaml --ckpt_path runs/base/…/last.ckpt \\
        --image photo.png --instruction "make the circle blue" --out edited.png

The model is built from the config arguments (as for `test`) on one process, loaded from a
Lightning `.ckpt` (`--ckpt_path`) or a `convert` directory (`--weights`), and edits the image as
`editing.py` says. `--sampler auto` samples as the release does (`QwenImageSampler`: 30 steps,
CFG 4, norm rescale, negative " ") for a `convert official` directory and with the config's own
sampler otherwise; `--resolutions auto` picks the release's ~1 MP list for a converted release and
the config's data buckets (`data.image_size`, or a manifest's `max_area`) otherwise. Beside the
image goes a JSON sidecar: the instruction (and, with `--rewrite`, the instruction a local
Qwen2.5-VL restated it as, which the edit used), seed, settings, the routing signature g per MoE layer
and the tag set nearest the alignment head's prediction. Both files are written atomically; a bad
input writes nothing. `Editor` (the loaded model with these settings) also serves `demo`.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tagmoe_lit.editing import Edit, EditInputError


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options `edit` and `demo` share: which weights, where they run, how they sample."""
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--ckpt_path", help="a Lightning .ckpt written by `fit`")
    weights.add_argument("--weights", help="a `convert official` / `convert export` directory")
    p.add_argument("--steps", type=int, help="sampler steps (default: the sampler's)")
    p.add_argument("--guidance", type=float, help="true CFG scale (default: the sampler's)")
    p.add_argument("--sampler", choices=["auto", "release", "config"], default="auto",
                   help="release: the TAG-MoE release's loop; config: the config's model.sampler; auto: release for a "
                        "`convert official` directory, else config")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, …")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the backbone's weights (routers stay fp32); bfloat16 halves a full-size model's memory on a GPU")
    p.add_argument("--resolutions", choices=["auto", "release", "buckets"], default="auto",
                   help="sizes the image snaps to: the release's ~1 MP list, or the config's data buckets; auto: release "
                        "for a `convert official` directory, else buckets")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tagmoe_lit edit", description=__doc__.splitlines()[0].split(": ", 1)[1])
    add_model_arguments(p)
    p.add_argument("--image", required=True, help="the image to edit (PNG, JPEG, WebP; RGBA is composited on white)")
    p.add_argument("--instruction", required=True, help="what to change, in words")
    p.add_argument("--out", default="edited.png", help="output PNG (a .json sidecar is written beside it; default: edited.png)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default: 0)")
    p.add_argument("--rewrite", metavar="QWEN_VL_DIR",
                   help="first restate the instruction with a local Qwen2.5-VL folder (tagmoe_lit/rewrite.py); "
                        "the sidecar keeps both")
    return p


def _from_release(weights: str | None) -> bool:
    """Is `weights` a `convert official` directory (its tagmoe_config.json names the release as source)?"""
    from tagmoe_lit.convert.files import TAGMOE_CONFIG

    config = Path(weights) / TAGMOE_CONFIG if weights else None
    return bool(config and config.is_file() and "release" in json.loads(config.read_text(encoding="utf-8")).get("source", ""))


@dataclass
class Editor:
    """A loaded model with its sampler and the sizes images snap to: `editor(image, instruction, seed)`."""

    model: Any
    sampler: Any
    resolutions: list[tuple[int, int]]
    settings: dict[str, Any]  # what the sidecar records about how the edit was made

    def __call__(self, image, instruction: str, seed: int = 0, steps: int | None = None) -> tuple[Edit, dict[str, Any]]:
        """The edit of a PIL image and its sidecar record."""
        from tagmoe_lit.editing import edit, reference_pixels

        sampler = copy.copy(self.sampler)
        if steps is not None:
            sampler.steps = _steps(steps)
        start = time.perf_counter()
        pixels = reference_pixels(image, self.resolutions)
        result = edit(self.model, pixels, instruction, sampler, seed=seed)
        record = {
            "instruction": instruction,
            "source_size": list(image.size),
            "size": [int(pixels.shape[2]), int(pixels.shape[1])],
            "seed": seed,
            **self.settings,
            "sampler": {"class": type(sampler).__name__, "steps": sampler.steps, "guidance": sampler.guidance,
                        "negative_prompt": sampler.negative_prompt, "renormalize": sampler.renormalize},
            "routing_signature": None if result.signature_LE is None else {
                f"layer_{i}": [round(float(p), 6) for p in row] for i, row in enumerate(result.signature_LE)},
            "predicted_tags": result.predicted_tags,
            "seconds": round(time.perf_counter() - start, 3),
        }
        return result, record


def _steps(steps: int) -> int:
    if steps < 1:
        raise EditInputError(f"--steps {steps} must be at least 1.")
    return steps


def load_editor(args: argparse.Namespace, config_args: list[str]) -> Editor:
    """Build the config's model on one process, load the weights, and settle the sampler and sizes."""
    import torch

    from tagmoe_lit.cli import one_cpu_cli
    from tagmoe_lit.convert.export import load_checkpoint
    from tagmoe_lit.editing import RELEASE_RESOLUTIONS, kit_resolutions
    from tagmoe_lit.sampling import QwenImageSampler

    release = _from_release(args.weights)
    cli = one_cpu_cli(config_args)
    model = cli.model
    load_checkpoint(model, args.ckpt_path or args.weights)
    model.eval().to(args.device)
    model.backbone.to(dtype=getattr(torch, args.dtype))
    data = cli.datamodule
    if args.resolutions == "release" or (args.resolutions == "auto" and release):
        resolutions, where = RELEASE_RESOLUTIONS, "release"
    elif hasattr(data, "buckets"):  # a manifest datamodule: the buckets it trains on
        resolutions, where = [(w, h) for h, w in data.buckets], f"the data's buckets within {data.max_area} px"
    else:
        resolutions, where = kit_resolutions(data.image_size, model.codec.downsample), f"buckets at {data.image_size}² px"
    choice = args.sampler if args.sampler != "auto" else ("release" if release else "config")
    sampler = QwenImageSampler() if choice == "release" else copy.copy(model.sampler)
    if args.steps is not None:
        sampler.steps = _steps(args.steps)
    if args.guidance is not None:
        sampler.guidance = args.guidance
    settings = {"weights": args.ckpt_path or args.weights, "device": args.device, "dtype": args.dtype, "resolutions": where}
    return Editor(model, sampler, resolutions, settings)


def png_bytes(image) -> bytes:
    """[3, H, W] in [0, 1] → PNG bytes."""
    from tagmoe_lit.editing import to_pil

    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tagmoe_lit.editing import open_image
    from tagmoe_lit.io import atomic_write_bytes, atomic_write_text

    args, rest = parser().parse_known_args(argv)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise EditInputError(f"--out {out} must end in .png (the edit is written as a PNG with a .json sidecar).")
    if args.steps is not None:
        _steps(args.steps)
    image = open_image(args.image)  # before the model is built: a bad image fails in a second
    instruction = args.instruction
    if args.rewrite:
        from tagmoe_lit.rewrite import InstructionRewriter

        instruction = InstructionRewriter(args.rewrite, args.device)(args.instruction, args.image)
    editor = load_editor(args, rest)
    result, record = editor(image, instruction, args.seed)
    record = {"image": str(args.image), **record, "instruction": args.instruction,
              "rewritten_instruction": instruction if args.rewrite else None}
    atomic_write_bytes(out, png_bytes(result.image))
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    tags = f"; the router reads it as {', '.join(result.predicted_tags)}" if result.predicted_tags else ""
    print(f"Edited {args.image} ({record['size'][0]}×{record['size'][1]}) → {out} and {out.with_suffix('.json').name}{tags}")
    return record
