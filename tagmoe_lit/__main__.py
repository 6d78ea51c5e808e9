"""`python -m tagmoe_lit <command> …`: the kit's one entry point, dispatched through `COMMANDS`.

`COMMANDS` maps each command name to its one-line help and a function that imports the command's
`main(argv)` only when that command runs, so `python -m tagmoe_lit --help` (the table) answers
at once and `params --help` does not wait for Lightning. Every command takes `--help`:

- `fit`, `validate`, `test`, `predict`: LightningCLI (`tagmoe_lit/cli.py`); the subcommand name
  stays in the arguments it parses;
- `annotate`: tag a JSONL manifest (rules or a local Qwen2.5-VL), or compare two annotations
  (`tagmoe_lit/tags/annotators/run.py`);
- `cache`: fill the text-embedding and latent caches for a manifest config ahead of training
  (`tagmoe_lit/data/build_cache.py`);
- `params`: total vs active parameters, full Qwen-Image or a config's backbone (`tagmoe_lit/params.py`);
- `plan`: one training step of a config on fake tensors and a fake process group: per-rank memory,
  FLOPs, collective bytes, host RAM and step time, checked against closed forms (`tagmoe_lit/plan/`);
- `knockout`: `test` with each expert removed from every MoE layer in turn (`tagmoe_lit/knockout.py`);
- `study`: the ablation study — train, test and compare every run of a preset, resumably
  (`tagmoe_lit/study/runner.py`);
- `edit`: edit one image by an instruction, as the release's pipeline does (`tagmoe_lit/edit_cli.py`);
- `demo`: the same edits on a local web page, with routing bars per MoE layer (`tagmoe_lit/demo.py`);
- `convert`: the official release's weights into the kit (`convert official`) and a checkpoint out
  to a diffusers-style transformer directory (`convert export`) (`tagmoe_lit/convert/cli.py`);
- `consolidate`: one `.ckpt` file from a sharded (FSDP2) checkpoint directory
  (`tagmoe_lit/distributed/cli.py`);
- `synthtag-export`: SynthTAG samples written as a manifest of PNG files (`tagmoe_lit/data/export.py`).

A new command is one entry in `COMMANDS` plus one line in the README's "Commands" section
(`tests/test_commands.py` checks that the two agree and that every command answers `--help`).
Without a command, or with `-h` / `--help`, the table is printed; an unknown command prints the
table and exits with status 2, as argparse does for a usage error.

An error the user can fix (a missing or corrupt file, a checkpoint of another model, a bad schema or
manifest, YAML that does not parse: `tagmoe_lit.errors.user_message`) ends the command with one
line on stderr, `error: <file>: <what is wrong>; <what to do>.`, and exit status 1; any other
exception is a bug and keeps its traceback. `TAGMOE_TRACEBACK=1` shows the traceback for both.
"""

from __future__ import annotations

import os
import sys
import traceback
from importlib import import_module
from typing import Any, Callable

Main = Callable[[list[str]], Any]


def _entry(module: str, function: str = "main") -> Callable[[], Main]:
    """Imports `module.function` when called: nothing is imported until a command is chosen."""
    return lambda: getattr(import_module(module), function)


def _lightning(subcommand: str) -> Callable[[], Main]:
    """The LightningCLI subcommand `subcommand`, given the arguments that follow it."""

    def load() -> Main:
        from tagmoe_lit.cli import main

        def lightning_main(argv: list[str]) -> Any:
            return main([subcommand, *argv])

        return lightning_main

    return load


COMMANDS: dict[str, tuple[str, Callable[[], Main]]] = {
    "fit": ("train a model (LightningCLI: --config experiments/base.yaml, any option from YAML or the command line)", _lightning("fit")),
    "validate": ("validation losses and routing of a checkpoint (LightningCLI)", _lightning("validate")),
    "test": ("per-task editing metrics of a checkpoint, written as test_report.{json,md} (LightningCLI)", _lightning("test")),
    "predict": ("generate one PNG per sample plus predictions.jsonl with routing signatures (LightningCLI)", _lightning("predict")),
    "annotate": ("tag a JSONL manifest (rules or a local Qwen2.5-VL), or compare two annotations", _entry("tagmoe_lit.tags.annotators.run")),
    "cache": ("fill the text-embedding and latent caches of a manifest config ahead of training", _entry("tagmoe_lit.data.build_cache")),
    "params": ("total vs active parameters of full Qwen-Image or of a config's backbone, on the meta device", _entry("tagmoe_lit.params")),
    "plan": ("one training step's per-rank memory, FLOPs, collectives and time on fake tensors, without a GPU", _entry("tagmoe_lit.plan.cli")),
    "knockout": ("test a checkpoint with each expert removed from every MoE layer in turn", _entry("tagmoe_lit.knockout")),
    "study": ("the ablation study: train, test and compare every run of a preset, resumably", _entry("tagmoe_lit.study.runner")),
    "edit": ("edit one image by an instruction with a checkpoint; writes the PNG and a JSON sidecar with the routing", _entry("tagmoe_lit.edit_cli")),
    "demo": ("a local web page (127.0.0.1) to edit images with a checkpoint and watch the routing per layer", _entry("tagmoe_lit.demo")),
    "convert": ("official release weights into the kit (official), a checkpoint out to diffusers layout (export)", _entry("tagmoe_lit.convert.cli")),
    "consolidate": ("one .ckpt file from a sharded (FSDP2) checkpoint directory", _entry("tagmoe_lit.distributed.cli")),
    "synthtag-export": ("write SynthTAG samples as a JSONL manifest of PNG files", _entry("tagmoe_lit.data.export")),
}


def usage() -> str:
    """The command table: every command and its one-line help."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (summary, _) in COMMANDS.items()]
    return "\n".join(["usage: python -m tagmoe_lit <command> [--help] ...", "", "commands:", *lines])


def run(argv: list[str] | None = None) -> Any:
    """Run the command named by `argv[0]` (default: the command line) with the rest of `argv`.

    Returns what the command's `main` returns. Help and usage errors end in `SystemExit`
    (status 0 and 2), as argparse's do.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(f"\nUnknown command '{command}'; choose one of the commands above.", file=sys.stderr)
        raise SystemExit(2)
    _, load = COMMANDS[command]
    return load()(rest)


def main(argv: list[str] | None = None) -> int:
    """`run(argv)` with the kit's one error path: the exit status, and one line for a user's mistake."""
    try:
        run(argv)
    except SystemExit as e:  # help, usage errors: argparse's status (None and 0 both mean success)
        if isinstance(e.code, int) or e.code is None:
            return e.code or 0
        print(e.code, file=sys.stderr)  # `sys.exit("message")`, as the interpreter would
        return 1
    except Exception as e:  # noqa: BLE001 - sorted into the user's mistakes and bugs below
        from tagmoe_lit.errors import user_message

        message = user_message(e)
        if message is None or os.environ.get("TAGMOE_TRACEBACK"):
            traceback.print_exc()
        if message is None:
            return 1
        sys.stderr.flush()
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    try:
        status = main()
    finally:
        # gloo/NCCL threads that outlive a process group nobody destroyed can abort the interpreter at
        # exit ("terminate called without an active exception") after a run that succeeded. A command
        # that never imported torch.distributed has no group, and `--help` need not import torch.
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    raise SystemExit(status)
