"""A content-addressed cache of annotator answers: JSON files keyed by a hash, written atomically.

A key hashes everything the answer depends on (the model's fingerprint, the prompt, the
instruction, the bytes of each input image, generation settings), so the cache is reused across
runs and manifests and never serves an answer for other inputs. Files go to `root/ab/abcd….json`;
each is written with `tagmoe_lit.io.atomic_write_text` (a temporary file in the same folder moved
into place), so a killed run never leaves a half-written entry.

`folder_fingerprint` identifies a model folder without reading multi-GB weights: small files by
their bytes, large ones by name, size and modification time (ns). A checkpoint rewritten in place
with the same size is therefore noticed; the price is that copying the folder without keeping
modification times (`cp` without `-p`) or touching a file also changes the fingerprint, which only
costs recomputing the cache entries, never a wrong one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from tagmoe_lit.io import atomic_write_text


def content_key(*parts: str | bytes) -> str:
    """sha256 over length-prefixed parts (so ("ab", "c") and ("a", "bc") differ)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def folder_fingerprint(folder: str | Path, patterns: Iterable[str] = ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt")) -> str:
    """Hash of a model folder: small files' bytes, large files' names, sizes and mtimes (cheap for 16 GB checkpoints)."""
    folder = Path(folder)
    parts: list[str | bytes] = []
    for path in sorted({p for pattern in patterns for p in folder.glob(pattern)}):
        stat = path.stat()
        parts += [path.name, path.read_bytes() if stat.st_size < 1 << 20 else f"{stat.st_size}/{stat.st_mtime_ns}"]
    return content_key(*parts)


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
        return json.loads(self._path(key).read_text(encoding="utf-8"))

    def put(self, key: str, value: Any) -> None:
        if self.root is not None:
            atomic_write_text(self._path(key), json.dumps(value))
