"""File helpers shared by every package: atomic writes, and paths written relative to a file's folder.

Atomic writes: a reader sees the old file or the whole new one, never half of it. Each write goes
to a temporary file in the destination folder (so the final move stays on one file system) and is
moved into place with `os.replace`; on any error the temporary file is removed and the destination
is left as it was. Missing parent folders are created.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "relative_path"]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically, encoded as UTF-8 unless told otherwise."""
    atomic_write_bytes(path, text.encode(encoding))


def relative_path(value: str, folder: str | Path) -> str:
    """A path as written in a file in `folder` (relative to it, or absolute) → normalized, relative to `folder`, '/'-separated.

    Lexical only (symbolic links are not followed), so `images/a.png`, `./images//a.png` and
    `/abs/folder/images/a.png` (for folder `/abs/folder`) all give `images/a.png`.
    """
    folder = os.path.abspath(folder)
    absolute = os.path.normpath(os.path.join(folder, value))
    return Path(os.path.relpath(absolute, folder)).as_posix()
