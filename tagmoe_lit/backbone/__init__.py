"""Backbone: diffusers' Qwen-Image MM-DiT, the FFN→MoE surgery, latent codecs, text encoders (and their disk caches)."""

from tagmoe_lit.backbone.cached import CachedCodec, CachedTextEncoder
from tagmoe_lit.backbone.codecs import PixelCodec, QwenVAECodec
from tagmoe_lit.backbone.qwen_image import QwenImageBackbone
from tagmoe_lit.backbone.text import FrozenTextEncoder, QwenVLTextEncoder

__all__ = ["CachedCodec", "CachedTextEncoder", "FrozenTextEncoder", "PixelCodec", "QwenImageBackbone", "QwenVAECodec", "QwenVLTextEncoder"]
