"""8-bit / 4-bit storage of *frozen* linear layers with bitsandbytes modules, on CPU or GPU.

Lightning's `BitsandbytesPrecision` is CUDA-only (DESIGN.md pitfall 20), and transformers'
quantized loading needs `accelerate` and a GPU, so this swaps `nn.Linear` for `bnb.nn.Linear8bitLt`
(LLM.int8, weights int8 + per-row scales) or `bnb.nn.Linear4bit` (NF4, compute in the input's
dtype) in place, copying the weights. Only frozen modules are quantized: the weights lose
precision and get no gradient, though inputs still get one (gradients flow *through* them).

Where it applies (`TagMoEModule.quantize_frozen`): the frozen text encoder, and with
`trainable: moe_tail` the backbone blocks that hold no MoE layer, or with `lora` (QLoRA) every
backbone block's Linears but the routers' (the adapters, the experts and routing stay in full precision). Quantized modules are for
single-process and DDP runs: FSDP cannot shard bitsandbytes' packed parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from tagmoe_lit.protocols import Backbone, TextEncoder

QuantMode = Literal["int8", "nf4"]
MODES = ("int8", "nf4")


def quantized_linear(linear: nn.Linear, mode: QuantMode) -> nn.Module:
    """A bitsandbytes copy of a frozen `linear`, quantized on its device."""
    import bitsandbytes as bnb

    device = linear.weight.device
    weight = linear.weight.detach().float().cpu()
    if mode == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().float().cpu(), requires_grad=False)
    return q.to(device)  # moving the bnb parameters is what quantizes them


def quantize_linears(module: nn.Module, mode: QuantMode, skip: tuple[str, ...] = ()) -> int:
    """Replace every `nn.Linear` inside frozen `module` (but those whose name starts with or holds a
    `skip` part) by its `mode` bitsandbytes copy; returns how many.

    Raises if any of the module's parameters is trainable: quantized weights get no gradient.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown quantization mode {mode!r}; choose one of {list(MODES)} (or null for none).")
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"Only frozen modules can be quantized, but {trainable[0]} (and {len(trainable) - 1} more) "
                         "requires grad; freeze it first (e.g. trainable: moe_tail).")
    targets = [(name, m) for name, m in module.named_modules()
               if name and type(m) is nn.Linear and not any(name.startswith(s) or s in name for s in skip)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, quantized_linear(linear, mode))
    return len(targets)


def quantize_frozen(mode: QuantMode, text_encoder: TextEncoder, backbone: Backbone, trainable: str, sharded: bool,
                    lora: bool = False) -> None:
    """Store the frozen text encoder's model and (trainable: moe_tail) the backbone blocks without an
    MoE layer, or (lora: QLoRA) every backbone block but its routers, in `mode`; refuse what cannot
    be done, and a setting that would quantize nothing."""
    blocks, skip = [], ()
    if lora and trainable != "moe_tail":
        if sharded:
            raise ValueError("QLoRA (lora with quantize_frozen) quantizes backbone blocks, which FSDP cannot shard; "
                             "use DDP or a single device, or set quantize_frozen: null.")
        blocks, skip = list(backbone.blocks), (".router.", "router.")  # routing stays in full precision
    elif trainable == "moe_tail":
        if sharded:
            raise ValueError("quantize_frozen with trainable: moe_tail quantizes backbone blocks, which FSDP cannot shard; "
                             "use DDP or a single device, or set quantize_frozen: null.")
        moe = {id(layer) for layer in backbone.moe_layers}
        blocks = [b for b in backbone.blocks if not any(id(m) in moe for m in b.modules())]
    text_model = text_encoder.frozen_model()
    swapped = quantize_linears(text_model, mode) if text_model is not None else 0
    for block in blocks:
        swapped += quantize_linears(block, mode, skip)
    if not swapped:
        raise ValueError(f"quantize_frozen: {mode} found no frozen linear layer (the text encoder "
                         f"{type(text_encoder).__name__} has no frozen model and trainable is {trainable}); "
                         "set quantize_frozen: null.")
