"""Weights in and out of the kit: the official TAG-MoE release → kit, kit checkpoint → diffusers-style directory."""

from tagmoe_lit.convert.files import kit_tensors, read_state_dict, save_transformer_dir
from tagmoe_lit.convert.load import load_transformer_dir
from tagmoe_lit.convert.official import OfficialInfo, from_official, to_official
from tagmoe_lit.convert.transformer import TagMoEQwenImageTransformer2DModel, transformer_from_dir

__all__ = [
    "OfficialInfo",
    "TagMoEQwenImageTransformer2DModel",
    "kit_tensors",
    "from_official",
    "load_transformer_dir",
    "read_state_dict",
    "save_transformer_dir",
    "to_official",
    "transformer_from_dir",
]
