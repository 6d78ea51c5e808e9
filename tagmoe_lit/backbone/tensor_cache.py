"""Content-addressed tensors on disk: one safetensors file per key, written atomically.

Keys hash the *input* (an instruction's text, an image tensor's bytes); a namespace folder hashes
the *producer* (which encoder or codec, with which settings and weights), so caches are reused
across runs and manifests and never mix outputs of different models. Each entry is written to a
temporary file in its folder and moved into place with `os.replace`: several processes may fill
the same cache, and a killed run never leaves a half-written file behind (`tagmoe_lit.io`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save

from tagmoe_lit.io import atomic_write_bytes
from tagmoe_lit.tags.annotators.answer_cache import content_key


def tensor_key(x: torch.Tensor) -> str:
    """Hash of a tensor's dtype, shape and bytes (wherever it lives)."""
    x = x.detach().cpu().contiguous()
    return content_key(str(x.dtype), str(tuple(x.shape)), x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")


class TensorCache:
    """key → tensor under `root/namespace/ab/abcd….safetensors`."""

    def __init__(self, root: str | Path, namespace: str):
        self.root = Path(root) / namespace

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        return load_file(str(path))["x"] if path.is_file() else None

    def put(self, key: str, x: torch.Tensor) -> None:
        atomic_write_bytes(self._path(key), save({"x": x.detach().cpu().contiguous()}))

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.safetensors")) if self.root.is_dir() else 0
