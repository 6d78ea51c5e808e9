"""Errors a person can act on: one sentence naming the file (or option), what is wrong and what to do.

`FileProblem` is the kit's error for a file the user handed in (a checkpoint, a config, an output
directory); its message is `"<path>[:line:column]: <problem>; <fix>."`. The checks here run before
anything is built or written, so a bad input fails in seconds and leaves nothing behind:

- `check_config_files`: every `--config` / `-c` file exists and parses as YAML (jsonargparse loses
  the file name of a YAML error and reports `"<unicode string>"`);
- `check_checkpoint_file`: `--ckpt_path` exists, is not empty, loads with
  `torch.load(weights_only=True)` (or is a sharded checkpoint directory) and is a tagmoe_lit
  checkpoint. Torch's own message for a file it cannot unpickle advises `weights_only=False`,
  which would run arbitrary code from the file: that advice is never passed on;
- `check_output_dir`: the run's `trainer.default_root_dir` can be created and written.

`user_message` turns the exceptions a user can cause (these, the kit's own `ValueError`s such as
`CheckpointMismatchError`, `ManifestError`, `TagSchemaError`, missing files, unreadable
checkpoints, YAML errors) into the one line `python -m tagmoe_lit` prints; anything else is a bug
and keeps its traceback. `parse_error_summary` condenses jsonargparse's nested report of a bad
option into that one line. Only the standard library is imported at module level, so the command
table stays fast.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

CKPT_FIX = "pass a .ckpt file written by `python -m tagmoe_lit fit` (e.g. runs/<run>/tensorboard/version_0/checkpoints/last.ckpt)"
SAFE_LOAD_ADVICE = re.compile(r"weights_only\s*=\s*False|Please file an issue|WeightsUnpickler", re.I)


class FileProblem(ValueError):
    """A file or directory given to the kit cannot be used: `path`, what is wrong, what to do."""

    def __init__(self, path: str | Path, problem: str, fix: str, where: str = ""):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{path}{where}: {problem}; {fix}.")


# -- configs ------------------------------------------------------------------------------------
def config_paths(argv: list[str]) -> list[str]:
    """The files given as `--config X`, `--config=X`, `-c X` in `argv`, in order."""
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_config_files(argv: list[str]) -> None:
    """Every config file in `argv` exists and is a YAML mapping; a parse error names file:line:column."""
    import yaml

    for name in config_paths(argv):
        path = Path(name)
        if not path.exists():
            raise FileProblem(path, "config file not found", "check the path given to --config (relative paths start at the working directory)")
        if not path.is_file():
            raise FileProblem(path, "is a directory, not a config file", "pass the path of a YAML file to --config")
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
            if context and start is not None and (mark is None or start.line != mark.line):
                problem += f", {context} at line {start.line + 1}"
            raise FileProblem(path, f"is not valid YAML ({problem})", "fix the YAML at that line (indentation, a missing ':' or closing bracket)", where) from None
        if data is None:
            raise FileProblem(path, "config file is empty", "write the options to set (see experiments/base.yaml) or drop this --config")
        if not isinstance(data, dict):
            raise FileProblem(path, f"holds a YAML {type(data).__name__}, not a mapping of options",
                              "write it as `key: value` lines (see experiments/base.yaml)")


# -- checkpoints --------------------------------------------------------------------------------
def _kind_of(path: Path) -> str:
    """What a file that is not a torch checkpoint looks like, for the message."""
    with path.open("rb") as f:
        head = f.read(4096)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 28:
        return "a safetensors file (bare weights, no training state or tagmoe record)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" not in text:
        return "a text file (YAML, JSON or similar), not a checkpoint"
    return "not a PyTorch checkpoint (random or corrupt bytes)"


def check_checkpoint_file(ckpt_path: str | Path | None) -> None:
    """Refuse a `--ckpt_path` that is missing, empty, unreadable or not a tagmoe_lit checkpoint.

    `last`, `best` and `hpc` (Lightning's names for a checkpoint it looks up) pass through. A
    directory must be a sharded (ModelParallelStrategy) checkpoint: `.metadata` and `meta.pt`.
    The file is memory-mapped, so the check reads only the pickled record, not the weights.
    """
    if ckpt_path is None or str(ckpt_path) in ("last", "best", "hpc", "registry"):
        return
    path = Path(ckpt_path)
    if not path.exists():
        raise FileProblem(path, "checkpoint not found", f"check the path given to --ckpt_path, or {CKPT_FIX}")
    if path.is_dir():
        from tagmoe_lit.distributed.checkpoint import is_sharded_checkpoint

        if not is_sharded_checkpoint(path):
            raise FileProblem(path, "is a directory but not a sharded checkpoint (no .metadata and meta.pt)", CKPT_FIX)
        return
    if path.stat().st_size == 0:
        raise FileProblem(path, "checkpoint is empty (0 bytes; a save was interrupted?)", f"delete it and {CKPT_FIX}")
    if not zipfile.is_zipfile(path):
        with path.open("rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        if zipped:  # a zip (torch.save's format) without its end
            raise FileProblem(path, "checkpoint is truncated (its end is missing: an interrupted save or copy)",
                              f"copy it again from where it was written, or {CKPT_FIX}")
        raise FileProblem(path, f"is {_kind_of(path)}", CKPT_FIX)
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types; its message may advise unsafe loading
        detail = "" if SAFE_LOAD_ADVICE.search(str(e)) else f": {str(e).splitlines()[0][:160]}" if str(e) else ""
        raise FileProblem(path, f"cannot be read as a checkpoint (truncated, or it holds more than tensors and plain data{detail})",
                          f"re-copy it, or {CKPT_FIX}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise FileProblem(path, "holds no 'state_dict': it is not a Lightning checkpoint", CKPT_FIX)
    if "tagmoe" not in checkpoint:
        raise FileProblem(path, "has no 'tagmoe' record: it was not written by tagmoe_lit", CKPT_FIX)


# -- output directories -------------------------------------------------------------------------
def check_output_dir(directory: str | Path | None) -> None:
    """`directory` exists and is writable, or can be created (its nearest existing parent is a writable directory)."""
    path = Path(directory or ".").absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FileProblem(existing, f"is a file, so the output directory {path} cannot be created there",
                          "set --trainer.default_root_dir to a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the output directory is not writable" if existing == path else f"is not writable, so the output directory {path} cannot be created"
        raise FileProblem(existing, what, "set --trainer.default_root_dir to a directory you can write, or change its permissions")


# -- one line for the user ----------------------------------------------------------------------
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def user_message(error: BaseException) -> str | None:
    """The one sentence to print for an error a user can fix, or None for a bug (keep its traceback).

    An error raised `from` another (jsonargparse wraps what a constructor raises) is judged by the
    first in its chain of causes that a user can fix."""
    while error is not None:
        message = _message(error)
        if message is not None:
            return message
        error = error.__cause__
    return None


def _message(error: BaseException) -> str | None:
    import pickle

    kind = type(error)
    if kind.__module__.split(".")[0] in ("tagmoe_lit", "callbacks") and isinstance(error, (ValueError, OSError, LookupError)):
        return str(error)
    if isinstance(error, _USER_OS_ERRORS):
        if error.filename is None:
            return str(error)
        reason = (error.strerror or kind.__name__).lower()
        return f"{error.filename}: {reason}; check the path (and its permissions) and run again."
    if isinstance(error, pickle.UnpicklingError) or (isinstance(error, RuntimeError) and "PytorchStreamReader" in str(error)):
        return ("A file could not be read as a PyTorch checkpoint (it is truncated or not a checkpoint); "
                f"{CKPT_FIX}.")
    if kind.__module__.startswith("yaml"):
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"A YAML file is not valid{where} ({getattr(error, 'problem', None) or error}); fix that file and run again."
    if kind.__name__ == "ArgumentError" and kind.__module__.startswith("jsonargparse"):
        return parse_error_summary(str(error))
    return None


_REASONS = [  # (pattern in jsonargparse's report, plain words); the first that matches wins
    (r"module '([\w.]+)' has no attribute '(\w+)'", lambda m: f"'{m[1]}.{m[2]}' does not exist (module {m[1]} has no {m[2]})"),
    (r"No module named '([\w.]+)'", lambda m: f"module {m[1]} cannot be imported"),
    (r"Expected a path but ([\w.]+) either not accessible or invalid", lambda m: f"class_path {m[1]} cannot be imported"),
    (r"Import path ([\w.]+) does not", lambda m: f"class_path {m[1]} cannot be imported"),
    (r"Expected a <class '(\w+)'>\. Got value: ([^\n]+)", lambda m: f"expected {m[1]}, got {m[2].strip()}"),
    (r"Unrecognized arguments: ([^\n]+)", lambda m: f"unknown option(s) {m[1].strip()}"),
    (r'Key "([\w.]+)" is required', lambda m: f"{m[1]} is required but not given"),
    (r"No action for key \"([\w.]+)\"", lambda m: f"there is no option {m[1]}"),
]


def parse_error_summary(message: str, command: str = "") -> str:
    """jsonargparse's (nested, many-line) report of a bad option as one sentence: the option, why, the fix."""
    keys = re.findall(r'[Pp]arser key "([\w.]+)"', message)
    option = ".".join(k for k in keys if k) if keys else ""
    reason = next((describe(m) for pattern, describe in _REASONS if (m := re.search(pattern, message, re.I))), None)
    if reason is None:
        lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
        reason = lines[-1][:240] if lines else "invalid value"
    help_hint = f"python -m tagmoe_lit {command} --help" if command else "--help"
    subject = f"option {option}" if option else "arguments"
    return f"Bad {subject}: {reason}; fix it in the config or on the command line ({help_hint} lists the options and types)."

