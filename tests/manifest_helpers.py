"""Tiny manifests made from SynthTAG samples written as PNGs (square, and wide 32×64 pairs)."""

import json
from pathlib import Path

import torch
from torchvision.io import write_png

from tagmoe_lit.data.export import export_synthtag
from tagmoe_lit.data.synthtag import SynthTAG


def square_manifest(root: Path, n: int = 18, seed: int = 0) -> Path:
    return export_synthtag(root / "square", n, seed=seed)


def wide_manifest(root: Path, n: int = 9, seed: int = 1) -> Path:
    """Rows whose images are two SynthTAG images side by side (32×64), so they fall in a wide bucket."""
    out = root / "wide"
    (out / "images").mkdir(parents=True, exist_ok=True)
    synth = SynthTAG(seed=seed)
    lines = []
    for i in range(n):
        a, b = synth.sample(2 * i), synth.sample(2 * i + 1, task=synth.tasks[(2 * i) % len(synth.tasks)])
        row = {"instruction": a.instruction, "target": f"images/{i}_t.png", "tags": a.tags, "task": a.task}
        write_png(torch.cat([a.target, b.target], dim=2), str(out / row["target"]))
        if a.source is not None:
            row["source"] = [f"images/{i}_s.png", f"images/{i}_s2.png"]  # only the first source is used
            write_png(torch.cat([a.source, b.target], dim=2), str(out / row["source"][0]))
            write_png(torch.cat([b.target, a.source], dim=2), str(out / row["source"][1]))
        lines.append(json.dumps(row))
    manifest = out / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest
