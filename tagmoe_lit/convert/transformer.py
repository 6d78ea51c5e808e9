"""`TagMoEQwenImageTransformer2DModel`: a kit-layout directory as a first-class diffusers model.

diffusers' dense `QwenImageTransformer2DModel.from_pretrained` cannot read a TAG-MoE directory
correctly: it builds dense FFNs where the MoE layers are, names the experts "unused", and leaves
those FFNs on the meta device (`low_cpu_mem_usage=True`: a crash at `.to()`) or randomly
initialized (`low_cpu_mem_usage=False`: silently wrong images). This subclass builds the MoE in its
constructor (the kit's `MoELayer`s in the last `moe_blocks` blocks, as the backbone's surgery does),
so diffusers' own `from_pretrained` / `save_pretrained` (dtype, `low_cpu_mem_usage`, sharding with
an index, `device_map`) load and save every weight, and it goes into a stock `QwenImagePipeline`
as `transformer=`; a pipeline saved with it names it in `model_index.json` by module and class,
and `DiffusionPipeline.from_pretrained` imports it from there.

Its config is `tagmoe_transformer.json`, not `config.json`: the dense class looks for
`config.json` and so refuses a TAG-MoE directory before it builds anything (with a diffusers
message naming the missing file; the directory's README.md says which class to use) instead of
loading half a model. `transformer_from_dir` reads directories written before this class existed
(dense `config.json` + `tagmoe_config.json`) as well.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin, QwenImageTransformer2DModel  # noqa: F401  (ModelMixin: see below)
from diffusers.configuration_utils import register_to_config

from tagmoe_lit.backbone.surgery import install_moe
from tagmoe_lit.convert.files import TAGMOE_CONFIG, key_problems, read_transformer_dir
from tagmoe_lit.convert.load import import_class
from tagmoe_lit.moe import LinearRouter, MoELayer
from tagmoe_lit.moe.expert_counts import ExpertCounts

# diffusers' pipeline loader finds a custom component's load method by looking its base classes
# (ModelMixin, …) up in the component's module, so this module must hold the name ModelMixin.
__all__ = ["ModelMixin", "TagMoEQwenImageTransformer2DModel", "transformer_from_dir"]
CONFIG_NAME = "tagmoe_transformer.json"
MOE_ARGS = ("num_experts", "top_k", "moe_blocks", "router", "expert_bias", "renormalize")
LINEAR_ROUTER = f"{LinearRouter.__module__}.{LinearRouter.__qualname__}"
README = """# TAG-MoE transformer ({layout} layout, written by tagmoe_lit)

The last {moe_blocks} of {num_layers} blocks hold {num_experts}-expert MoE layers instead of dense image FFNs.
Load it with the kit's class, not diffusers' dense `QwenImageTransformer2DModel`
(that class would build dense FFNs where the experts are; it finds no `config.json` here and stops):

    from tagmoe_lit import TagMoEQwenImageTransformer2DModel
    transformer = TagMoEQwenImageTransformer2DModel.from_pretrained(THIS_DIR, torch_dtype=torch.bfloat16)
    pipe = QwenImagePipeline.from_pretrained(QWEN_IMAGE_DIR, transformer=transformer)

or into a kit model (`model.init_weights: THIS_DIR`, `--ckpt_path THIS_DIR`).
"""


class TagMoEQwenImageTransformer2DModel(QwenImageTransformer2DModel):
    """Qwen-Image's MM-DiT with the kit's MoE layers in the image stream of its last `moe_blocks` blocks.

    The dense arguments are diffusers' (listed again because diffusers reads a model's config keys
    from its constructor's signature); the MoE ones are the kit's `MoELayer` settings. Weight names
    are the kit layout's (`…img_mlp.router.gate.weight`, `…img_mlp.experts.w1_EDH`, …).
    """

    config_name = CONFIG_NAME
    # a kit directory also holds the tag embedder and head, which are not part of the transformer
    _keys_to_ignore_on_load_unexpected = [r"^tag_embedder\.", r"^head\."]
    _tp_plan = None  # diffusers' plan shards the dense img_mlp that the MoE blocks no longer have

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int | None = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        zero_cond_t: bool = False,
        use_additional_t_cond: bool = False,
        use_layer3d_rope: bool = False,
        num_experts: int = 4,
        top_k: int = 1,
        moe_blocks: int = 10,
        router: str = LINEAR_ROUTER,
        expert_bias: bool = False,
        renormalize: bool = False,
    ):
        super().__init__(
            patch_size=patch_size, in_channels=in_channels, out_channels=out_channels, num_layers=num_layers,
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim, guidance_embeds=guidance_embeds, axes_dims_rope=axes_dims_rope,
            zero_cond_t=zero_cond_t, use_additional_t_cond=use_additional_t_cond, use_layer3d_rope=use_layer3d_rope,
        )
        if moe_blocks:  # experts keep their own draws: from_pretrained overwrites every one of them
            make = partial(MoELayer, num_experts=num_experts, top_k=top_k, router=import_class(router),
                           expert_bias=expert_bias, renormalize=renormalize)
            install_moe(self.transformer_blocks, moe_blocks, make, pretrained=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> "TagMoEQwenImageTransformer2DModel":
        """diffusers' loader, made strict: a missing or unexpected weight is an error, not a warning
        (a partly initialized MoE would produce images without saying it is wrong)."""
        src, again = pretrained_model_name_or_path, "export it again with `python -m tagmoe_lit convert export`"
        if kwargs.get("ignore_mismatched_sizes"):
            raise ValueError("ignore_mismatched_sizes=True would leave mismatched experts randomly initialized; "
                             f"load {src} with the config it was saved with.")
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(src, output_loading_info=True, **kwargs)
        except ValueError as e:
            if "expected shape" not in str(e):
                raise
            raise ValueError(f"{src} does not fit its own {CONFIG_NAME} ({str(e).split(' If you want')[0]}); {again}.") from e
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            listing = "; ".join(f"{len(v)} {k.replace('_', ' ')}: {', '.join(sorted(map(str, v))[:4])}{' …' * (len(v) > 4)}"
                                for k, v in problems.items())
            raise ValueError(f"{src} does not fit its own {CONFIG_NAME} ({listing}); {again}.")
        device = next(model.parameters()).device
        for counts in model.modules():  # diffusers builds buffers on meta and loads only saved ones
            if isinstance(counts, ExpertCounts) and counts.pending_E.is_meta:
                counts.to_empty(device=device)
                counts.reset_parameters()
        return (model, info) if want_info else model


def class_config(dense_config: dict[str, Any], moe: dict[str, Any]) -> dict[str, Any]:
    """`TagMoEQwenImageTransformer2DModel`'s config from a dense diffusers config and a `tagmoe_config`
    (its `moe_blocks` is the list of MoE block indices; the class takes their number, a suffix)."""
    dense = {k: v for k, v in dense_config.items() if not k.startswith("_")}
    blocks, layers = moe.get("moe_blocks") or [], dense.get("num_layers", 60)
    if blocks != list(range(layers - len(blocks), layers)):
        raise ValueError(f"MoE blocks {blocks} are not the last blocks of {layers}; the kit installs MoE in a suffix of blocks.")
    settings = {k: moe.get(k) for k in MOE_ARGS if k != "moe_blocks"}
    if not blocks:
        settings = {"num_experts": 1, "top_k": 1, "router": LINEAR_ROUTER, "expert_bias": False, "renormalize": False}
    return {"_class_name": TagMoEQwenImageTransformer2DModel.__name__, **dense, **settings, "moe_blocks": len(blocks)}


def class_files(dense_config: dict[str, Any] | None, tagmoe_config: dict[str, Any]) -> dict[str, str]:
    """The files that make a kit-layout directory a diffusers model: the class's config and a README
    (none when the dense sizes are unknown or the layout is the release's)."""
    import diffusers

    if dense_config is None or tagmoe_config.get("layout") != "kit":
        return {}
    config = {**class_config(dense_config, tagmoe_config), "_diffusers_version": diffusers.__version__}
    readme = README.format(layout="kit", moe_blocks=config["moe_blocks"], num_layers=config["num_layers"],
                           num_experts=config["num_experts"])
    return {CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True) + "\n", "README.md": readme}


def transformer_from_dir(src: str | Path, torch_dtype: torch.dtype | None = None) -> TagMoEQwenImageTransformer2DModel:
    """A kit-layout directory as `TagMoEQwenImageTransformer2DModel`, every key checked; directories
    written before the class existed (dense `config.json` + `tagmoe_config.json`) too."""
    src = Path(src)
    if (src / CONFIG_NAME).is_file():
        return TagMoEQwenImageTransformer2DModel.from_pretrained(src, torch_dtype=torch_dtype)
    tensors, tagmoe = read_transformer_dir(src)
    if tagmoe.get("layout") != "kit":
        raise ValueError(f"{src} is in the {tagmoe.get('layout')!r} layout; convert it with `convert official` first.")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has neither {CONFIG_NAME} nor diffusers' config.json, so the transformer's sizes are "
                                f"unknown; write it again with `python -m tagmoe_lit convert export` (see {TAGMOE_CONFIG}).")
    dense = QwenImageTransformer2DModel.load_config(src)
    model = TagMoEQwenImageTransformer2DModel.from_config(class_config(dense, tagmoe))
    weights = {k: t for k, t in tensors.items() if not k.startswith(("tag_embedder.", "head."))}
    problems = key_problems("transformer", weights, model.state_dict())
    if problems:
        raise ValueError(f"{src} does not fit its own config.json: " + "; ".join(problems) + ".")
    model.load_state_dict(weights)
    return model.to(torch_dtype) if torch_dtype is not None else model
