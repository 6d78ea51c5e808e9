"""Write SynthTAG samples as a manifest of PNG files: a real-data pipeline test with known answers.

    python -c "from tagmoe_lit.data.export import export_synthtag; export_synthtag('data/synth', 2000)"

Each row gets the instruction, `target`, `source` (not for text-to-image), `task` and — unless
`tags=False` — SynthTAG's ground-truth tags, so the same folder serves training
(`ManifestDataModule`), annotation (`annotate` on an untagged copy) and checking annotators against
the truth (`annotate --compare`). `experiments/data/synthtag_tiny/` was written by this function.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from torchvision.io import write_png

from tagmoe_lit.data.synthtag import SynthTAG
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
