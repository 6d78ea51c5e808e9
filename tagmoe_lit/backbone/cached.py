"""Drop-in text encoder and codec that keep their outputs on disk (`TensorCache`), for real data.

    model:
      text_encoder:
        class_path: tagmoe_lit.backbone.CachedTextEncoder
        init_args: {cache_dir: cache/}
      codec:
        class_path: tagmoe_lit.backbone.CachedCodec
        init_args:
          cache_dir: cache/
          codec: {class_path: tagmoe_lit.backbone.QwenVAECodec, init_args: {pretrained_path: /models/Qwen-Image/vae}}

`CachedTextEncoder` is `FrozenTextEncoder` whose per-instruction features (encoded alone, as
always) are also stored under a hash of the text, in a folder named by a fingerprint of the model
folder and `max_length`. `CachedCodec` encodes each image of a batch alone and stores its tokens
under a hash of the image's float32 values (shape and values, not its dtype), in a folder named by
a hash of the wrapped codec's structure, plain settings (e.g. `patch`), parameters and buffers
(their dtype included). Manifest images are fitted deterministically (no random crops), so a row
gives the same values every epoch and run, and hits the cache. Keying on float32 values means an
image handed over in bfloat16 or float16 finds the entry of the float32 image with the same values
(the `cache` command encodes float32 images) instead of silently missing it; such an entry was
computed from the float32 image and is returned cast to the input's dtype. Otherwise a stored
tensor is returned exactly, so the cache does not change training; only the first computation of
an entry happens on whatever device met it first. `python -m tagmoe_lit cache` fills both ahead
of training.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from tagmoe_lit.backbone.tensor_cache import TensorCache, tensor_key
from tagmoe_lit.backbone.text import FrozenTextEncoder
from tagmoe_lit.tags.annotators.answer_cache import content_key, folder_fingerprint


class CachedTextEncoder(FrozenTextEncoder):
    """`FrozenTextEncoder` with a disk cache of each instruction's features under `cache_dir`."""

    def __init__(
        self, cache_dir: str, pretrained_path: str | None = None, max_length: int = 32, dim: int | None = None, cache_size: int = 100_000
    ):
        """
        Args:
            cache_dir: cache folder (shared with `CachedCodec` if you like; entries never collide).
            pretrained_path: local folder with config, tokenizer and weights (default: bundled MiniLM).
            max_length: instructions are truncated to this many tokens.
            dim: hidden size, read from the folder's config when not given.
            cache_size: most instructions also kept in memory (least recently used ones are dropped).
        """
        super().__init__(pretrained_path, max_length, dim, cache_size)
        producer = content_key("FrozenTextEncoder", folder_fingerprint(self.pretrained_path), str(max_length))
        self.store = TensorCache(cache_dir, f"text-{producer[:16]}")

    def _features(self, text: str, device: torch.device | str = "cpu") -> torch.Tensor:
        if text in self._cache:
            self._cache.move_to_end(text)
            return self._cache[text]
        key = content_key(text)
        features = self.store.get(key)
        if features is None:
            features = super()._features(text, device)  # encodes alone and fills the memory cache
            self.store.put(key, features)
            return features
        self._cache[text] = features
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return features


class CachedCodec(nn.Module):
    """Any codec, with each image's tokens stored on disk under a hash of its pixels."""

    def __init__(self, codec: nn.Module, cache_dir: str):
        """
        Args:
            codec: the codec to wrap (e.g. `tagmoe_lit.backbone.QwenVAECodec`); decoding is passed through.
            cache_dir: cache folder.
        """
        super().__init__()
        self.codec, self.cache_dir = codec, cache_dir
        self._store: TensorCache | None = None

    # the attributes the module reads from a codec
    @property
    def patch(self) -> int:
        return self.codec.patch

    @property
    def channels(self) -> int:
        return self.codec.channels

    @property
    def downsample(self) -> int:
        return self.codec.downsample

    @property
    def token_channels(self) -> int:
        return self.codec.token_channels

    @property
    def store(self) -> TensorCache:
        """The cache folder of this exact codec (its structure and weights are hashed on first use)."""
        if self._store is None:
            settings = {
                k: v for k, v in vars(self.codec).items()
                if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool, tuple))
            }
            parts = [type(self.codec).__qualname__, repr(self.codec), repr(sorted(settings.items()))]
            for name, t in itertools.chain(self.codec.named_parameters(), self.codec.named_buffers()):
                parts += [name, tensor_key(t)]
            self._store = TensorCache(self.cache_dir, f"codec-{content_key(*parts)[:16]}")
        return self._store

    @torch.no_grad()
    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        tokens = []
        for image in images_B3HW:
            key = tensor_key(image.float())  # the values, whatever the dtype they arrive in (module doc)
            cached = self.store.get(key)
            if cached is None:
                cached = self.codec.encode(image[None])[0]
                self.store.put(key, cached)
            tokens.append(cached.to(images_B3HW.device, images_B3HW.dtype))
        return torch.stack(tokens)

    def decode(self, tokens_BTP: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.codec.decode(tokens_BTP, h, w)
