"""Write SynthTAG samples as a manifest of PNG files: a real-data pipeline test with known answers.

    python -m tagmoe_lit synthtag-export data/synth 2000 [--seed 0] [--image_size 32] [--tasks recolor relight]

Each row gets the instruction, `target`, `source` (not for text-to-image), `task` and — unless
`tags=False` — SynthTAG's ground-truth tags, so the same folder serves training
(`ManifestDataModule`), annotation (`annotate` on an untagged copy) and checking annotators against
the truth (`annotate --compare`). `experiments/data/synthtag_tiny/` was written by this function.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from torchvision.io import write_png

from tagmoe_lit.data.synthtag import TASK_TAGS, TASKS, SynthTAG
from tagmoe_lit.io import atomic_write_text


def export_synthtag(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    image_size: int = 32,
    tasks: Sequence[str] | None = None,
    tags: bool = True,
    masks: bool = False,
    manifest_name: str = "manifest.jsonl",
) -> Path:
    """Write samples 0..n-1 as `images/*.png` plus `manifest_name` under `out_dir`; returns the manifest path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    synth = SynthTAG(image_size=image_size, seed=seed, tasks=tasks)
    lines = []
    for i in range(n):
        s = synth.sample(i)
        row = {"instruction": s.instruction, "target": f"images/{i:05d}_target.png"}
        write_png(s.target, str(out / row["target"]))
        if s.source is not None:
            row["source"] = f"images/{i:05d}_source.png"
            write_png(s.source, str(out / row["source"]))
        if masks:
            row["mask"] = f"images/{i:05d}_mask.png"
            write_png(s.mask[None].to(s.target.dtype) * 255, str(out / row["mask"]))
        if tags:
            row["tags"] = s.tags
        row["task"] = s.task
        lines.append(json.dumps(row))
    manifest = out / manifest_name
    atomic_write_text(manifest, "\n".join(lines) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> Path:
    """`python -m tagmoe_lit synthtag-export`: `export_synthtag` from the command line (options named as its arguments)."""
    p = argparse.ArgumentParser(prog="python -m tagmoe_lit synthtag-export", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder for images/*.png and the manifest (created if missing)")
    p.add_argument("n", type=int, help="number of samples: SynthTAG indices 0..n-1")
    p.add_argument("--seed", type=int, default=0, help="SynthTAG seed (default: 0)")
    p.add_argument("--image_size", type=int, default=32, help="image side in pixels (default: 32)")
    p.add_argument("--tasks", nargs="+", choices=list(TASK_TAGS), metavar="TASK", help=f"only these tasks, cycled in order (default: all of {', '.join(TASKS)})")
    p.add_argument("--tags", action=argparse.BooleanOptionalAction, default=True, help="write the ground-truth tags (default: yes)")
    p.add_argument("--masks", action=argparse.BooleanOptionalAction, default=False, help="write each sample's edit mask as a PNG (default: no)")
    p.add_argument("--manifest_name", default="manifest.jsonl", help="manifest file name inside out_dir (default: manifest.jsonl)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"n must be at least 1, got {args.n}")
    manifest = export_synthtag(args.out_dir, args.n, args.seed, args.image_size, args.tasks, args.tags, args.masks, args.manifest_name)
    print(f"Wrote {args.n} samples: {manifest}")
    return manifest
