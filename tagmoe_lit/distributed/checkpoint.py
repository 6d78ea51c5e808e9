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
    single-process checkpoint. The optimizer states are kept, re-keyed from parameter names (the
    sharded form) to positions (what a plain optimizer loads), so `fit --ckpt_path` resumes from the
    file in one process, or under DDP, whatever sharding or expert parallelism wrote it; a sharded
    run can also resume from the directory itself (torch.distributed.checkpoint reshards it).
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
        full = torch.load(gathered, map_location="cpu", weights_only=True, mmap=True)
        metadata = torch.load(folder / "meta.pt", map_location="cpu", weights_only=True)
        optimizers = [by_position(full[f"optimizer_{i}"]) for i in range(sum(k.startswith("optimizer_") for k in full))]
        torch.save({**metadata, "state_dict": full["state_dict"], "optimizer_states": optimizers}, partial)
        os.replace(partial, output)  # a failure above never leaves a truncated .ckpt that looks valid
    finally:
        gathered.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return output


def by_position(optimizer_state: dict) -> dict:
    """A name-keyed optimizer state dict (`torch.distributed.checkpoint.state_dict`'s form) keyed by
    position instead, as `torch.optim.Optimizer.load_state_dict` expects: parameters are numbered in
    the order of the param groups' name lists, which is the optimizer's own order."""
    position: dict[str, int] = {}
    groups = []
    for group in optimizer_state["param_groups"]:
        ids = [position.setdefault(name, len(position)) for name in group["params"]]
        groups.append({**group, "params": ids})
    state = {position[name]: value for name, value in optimizer_state["state"].items()}
    return {"state": state, "param_groups": groups}
