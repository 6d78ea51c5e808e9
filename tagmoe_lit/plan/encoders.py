"""The frozen encoders' memory: every rank holds a whole copy of the text encoder and the codec.

They are not sharded (`wrap_model` shards the backbone, tag embedder and head only) and do not
take part in the planned step's tracked memory, so the plan adds them per rank: the number of
parameters times the bytes each is stored in. Qwen-Image's own encoders live in local folders the
plan does not read, so they are counted on the meta device from Qwen-Image's configs (Qwen2.5-VL-7B,
8,292,166,656 parameters; its VAE, `AutoencoderKLQwenImage`'s defaults, 126,892,531); the kit's
small encoders are built and counted (the bundled MiniLM: 22.7 M); a pixel codec holds nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Qwen-Image's text_encoder/config.json (Qwen2.5-VL-7B-Instruct), the fields that set parameter shapes
QWEN2_5_VL_7B = {
    "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "in_chans": 3},
    "tie_word_embeddings": False,
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _numel_on_meta(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def qwen_vl_parameters() -> int:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return _numel_on_meta(lambda: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN2_5_VL_7B)))


def qwen_vae_parameters() -> int:
    from diffusers import AutoencoderKLQwenImage

    return _numel_on_meta(AutoencoderKLQwenImage)


def _stored_bytes(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() * p.element_size() for p in module.parameters())


def frozen_encoder_bytes(text: Any, codec: Any, default_codec: nn.Module) -> dict[str, int]:
    """{"text encoder": bytes, "codec": bytes} one rank holds, from the configured classes (None: the
    module's defaults). A disk cache (`CachedTextEncoder`, `CachedCodec`) still holds its encoder."""
    from tagmoe_lit.backbone import FrozenTextEncoder

    if text is not None and text.class_path == "tagmoe_lit.backbone.QwenVLTextEncoder":
        text_bytes = qwen_vl_parameters() * DTYPE_BYTES[text.init_args.get("dtype") or "bfloat16"]
    else:  # FrozenTextEncoder or its cached form (`_text_dim` refuses any other)
        path = text.init_args.get("pretrained_path") if text is not None else None
        text_bytes = _stored_bytes(FrozenTextEncoder(pretrained_path=path).frozen_model())
    return {"text encoder": text_bytes, "codec": _codec_bytes(codec, default_codec)}


def _codec_bytes(codec: Any, default: nn.Module) -> int:
    if codec is None:
        return _stored_bytes(default)
    if codec.class_path == "tagmoe_lit.backbone.QwenVAECodec":
        return qwen_vae_parameters() * 4  # loaded in fp32 (`from_pretrained` without a dtype)
    if codec.class_path == "tagmoe_lit.backbone.CachedCodec":
        return _codec_bytes(codec.init_args.codec, default)
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--codec", type=nn.Module)
    return _stored_bytes(parser.instantiate_classes(parser.parse_object({"codec": codec})).codec)
