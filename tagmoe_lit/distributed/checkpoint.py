"""Consolidation of a ModelParallelStrategy (FSDP2) checkpoint directory into one `.ckpt` file."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def is_sharded_checkpoint(folder: Path) -> bool:
    """A ModelParallelStrategy checkpoint directory: each rank's shards (`.metadata`) and `meta.pt`."""
    return (folder / ".metadata").is_file() and (folder / "meta.pt").is_file()


def consolidate_checkpoint(folder: str | Path, output: str | Path) -> Path:
    """One `.ckpt` file from a ModelParallelStrategy checkpoint directory, loadable in a single process.

    The directory holds each rank's shards (torch.distributed.checkpoint) and `meta.pt` (step,
    loops, callbacks, the `tagmoe` record). The result holds the full `state_dict` and that
    metadata, so `validate` / `test` / `predict --ckpt_path` and `convert export` read it like any
    single-process checkpoint. Optimizer states are left out: their sharded form is keyed by
    parameter name, which a plain optimizer cannot load; resume training from the directory
    itself (torch.distributed.checkpoint reshards it to any world size).
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder, output = Path(folder), Path(output)
    if not is_sharded_checkpoint(folder):
        raise ValueError(f"{folder} is not a ModelParallelStrategy checkpoint directory (no .metadata / meta.pt); "
                         "pass the `.ckpt` directory the run saved.")
    gathered = output.with_name(f".{output.name}.gathered")
    partial = output.with_name(f".{output.name}.partial")
    try:
        dcp_to_torch_save(folder, gathered)  # every shard, gathered without a process group
        state_dict = torch.load(gathered, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
        metadata = torch.load(folder / "meta.pt", map_location="cpu", weights_only=True)
        torch.save({**metadata, "state_dict": state_dict}, partial)
        os.replace(partial, output)  # a failure above never leaves a truncated .ckpt that looks valid
    finally:
        gathered.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return output
