"""A content-addressed cache of annotator answers: JSON files keyed by a hash, written atomically.

A key hashes everything the answer depends on (the model's fingerprint, the prompt, the
instruction, the bytes of each input image, generation settings), so the cache is reused across
runs and manifests and never serves an answer for other inputs. Files go to `root/ab/abcd….json`;
each is written to a temporary file in the same folder and moved into place with `os.replace`, so
a killed run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable


def content_key(*parts: str | bytes) -> str:
    """sha256 over length-prefixed parts (so ("ab", "c") and ("a", "bc") differ)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def folder_fingerprint(folder: str | Path, patterns: Iterable[str] = ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt")) -> str:
    """Hash of a model folder: small files' bytes, large files' names and sizes (cheap for 16 GB checkpoints)."""
    folder = Path(folder)
    parts: list[str | bytes] = []
    for path in sorted({p for pattern in patterns for p in folder.glob(pattern)}):
        size = path.stat().st_size
        parts += [path.name, path.read_bytes() if size < 1 << 20 else str(size)]
    return content_key(*parts)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AnswerCache:
    """key → JSON value under a folder (None: a cache that stores nothing)."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Any | None:
        if self.root is None or not self._path(key).is_file():
            return None
        return json.loads(self._path(key).read_text())

    def put(self, key: str, value: Any) -> None:
        if self.root is not None:
            atomic_write_text(self._path(key), json.dumps(value))
