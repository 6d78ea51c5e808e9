"""`python -m tagmoe_lit consolidate FOLDER OUTPUT`: a sharded checkpoint directory as one `.ckpt` file.

A ModelParallelStrategy (FSDP2) run with `save_distributed_checkpoint: true` saves a directory of
shards; `validate`, `test`, `predict` and `convert export` in one process want one file. This is
only the command line around `consolidate_checkpoint` (`tagmoe_lit/distributed/checkpoint.py`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m tagmoe_lit consolidate",
        description="Write one .ckpt file (full state_dict, optimizer states by position and training metadata) "
        "from a ModelParallelStrategy checkpoint directory, loadable in a single process.",
    )
    parser.add_argument("folder", help="the checkpoint directory a ModelParallelStrategy run saved (e.g. last.ckpt/)")
    parser.add_argument("output", help="the single .ckpt file to write")
    args = parser.parse_args(argv)
    from tagmoe_lit.distributed.checkpoint import consolidate_checkpoint  # imported late: `--help` stays instant

    try:
        path = consolidate_checkpoint(args.folder, args.output)
    except ValueError as e:
        raise SystemExit(f"consolidate: {e}") from e
    print(f"Wrote {path}")
    return path
