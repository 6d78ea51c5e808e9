"""`python -m tagmoe_lit cache`: fill the text and image caches ahead of training.

    python -m tagmoe_lit cache --config experiments/base.yaml --config my_data.yaml

It reads the same config as `fit` (so cache keys match what training will look up), loads every
good row of the manifest data module (train, validation and test) exactly as training does, and
passes each instruction through `model.text_encoder` and each target and source image through
`model.codec`. Only a `CachedTextEncoder` or `CachedCodec` stores anything: the config must use at
least one of them. Entries already present are read, not recomputed, so the command resumes.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from tagmoe_lit.backbone import CachedCodec, CachedTextEncoder
from tagmoe_lit.data.manifest_datamodule import ManifestDataModule


def build_caches(
    datamodule: ManifestDataModule, text_encoder: nn.Module | None, codec: nn.Module | None, progress: bool = True
) -> dict[str, int]:
    """Encode every row once; returns {"rows", "text_entries", "codec_entries"} (entries now in each cache)."""
    from tqdm.auto import tqdm

    load = datamodule.row_loader(train=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if codec is not None:
        codec.to(device)
    seen_text: set[str] = set()
    for i, row in enumerate(tqdm(datamodule.rows, desc="cache", unit="row", disable=not progress)):
        if text_encoder is not None and row.instruction not in seen_text:
            text_encoder([row.instruction])
            seen_text.add(row.instruction)
        if codec is not None:
            sample = load(row, i)
            if sample is not None:  # unreadable images are reported by the loader (error or skip)
                codec.encode(sample["target"][None].to(device))
                codec.encode(sample["source"][None].to(device))  # zeros for text-to-image, as in training
    return {
        "rows": len(datamodule.rows),
        "text_entries": len(text_encoder.store) if text_encoder is not None else 0,
        "codec_entries": len(codec.store) if codec is not None else 0,
    }


def main(args: list[str]) -> dict[str, int]:
    from tagmoe_lit.cli import TagMoECLI

    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0)
    cli = TagMoECLI(args=args, run=False)
    dm, model = cli.datamodule, cli.model
    if not isinstance(dm, ManifestDataModule):
        raise SystemExit(
            f"cache works on manifest data, but the config's data module is {type(dm).__name__}; "
            "set data.class_path: tagmoe_lit.data.ManifestDataModule."
        )
    text = model.text_encoder if isinstance(model.text_encoder, CachedTextEncoder) else None
    codec = model.codec if isinstance(model.codec, CachedCodec) else None
    if text is None and codec is None:
        raise SystemExit(
            "Nothing to cache: set model.text_encoder to tagmoe_lit.backbone.CachedTextEncoder and/or model.codec to "
            "tagmoe_lit.backbone.CachedCodec (each with a cache_dir) in the config."
        )
    counts = build_caches(dm, text, codec)
    print(f"Cached {counts['rows']} rows: {counts['text_entries']} text entries, {counts['codec_entries']} image entries.", file=sys.stderr)
    return counts
