"""Which parameters learn: what cannot reach the loss always freezes, `moe_tail` freezes the rest,
`lora` freezes the backbone (with `moe_tail`: its dense part) and adds adapters; `settle_parameters` runs these, and the quantization
of frozen parts, in the one order that works.

`freeze_unreachable`: modules whose output nothing reads (the backbone names them: in the MM-DiT,
the last block's text stream) never get a gradient. Left trainable, DDP stops with "parameters that
were not used in producing the loss" (DESIGN.md pitfall 2); frozen, training is unchanged (they
never moved) and DDP needs no unused-parameter search.

`train_only_moe_tail`: `trainable: moe_tail` — only the MoE layers (experts, routers), the tag embedder and
the head learn; the rest of the backbone is frozen (and may be stored in 8/4 bits, `quantize.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from tagmoe_lit.module import TagMoEModule


def freeze_unreachable(dead_ends: Iterable[nn.Module]) -> None:
    """Freeze the modules a backbone reports as never reaching its output (`Backbone.dead_ends`)."""
    for dead in dead_ends:
        dead.requires_grad_(False)


def train_only_moe_tail(root: nn.Module, moe_layers: list[nn.Module], others: Iterable[nn.Module | None]) -> None:
    """Freeze everything under `root` except the MoE layers and `others` (None entries skipped)."""
    if not moe_layers:
        raise ValueError("trainable: moe_tail needs MoE layers, but the backbone has none; set model.backbone.init_args.moe "
                         "or use trainable: all.")
    root.requires_grad_(False)
    for part in (*moe_layers, *others):
        if part is not None:
            part.requires_grad_(True)


def check_options(trainable: str, quantize_frozen: str | None, meta_init: bool, init_weights: str | None, lora: bool = False,
                  lora_targets: tuple[str, ...] = ()) -> None:
    """Refuse unknown values and combinations that cannot work, all in one error."""
    problems = []
    if lora and trainable == "moe_tail" and "experts" in lora_targets:
        problems.append("trainable: moe_tail trains the experts whole, so LoRA cannot also target them; drop 'experts' "
                        "from model.lora.targets (adapters then go on the frozen dense part)")
    if lora and quantize_frozen and (meta_init or init_weights is not None):
        problems.append("QLoRA (lora with quantize_frozen) quantizes the backbone as it is built, so it cannot be built on meta "
                        "or filled by init_weights afterwards; start from backbone.init_args.pretrained_path instead")
    if trainable not in ("all", "moe_tail"):
        problems.append(f"trainable='{trainable}' is unknown; choose 'all' or 'moe_tail'")
    if quantize_frozen not in (None, "int8", "nf4"):
        problems.append(f"quantize_frozen='{quantize_frozen}' is unknown; choose null, 'int8' or 'nf4'")
    if meta_init and quantize_frozen and trainable == "moe_tail":
        problems.append("meta_init cannot quantize frozen backbone blocks that do not exist yet (quantize_frozen with "
                        "trainable: moe_tail); set meta_init: false or quantize_frozen: null")
    if init_weights is not None and quantize_frozen and trainable == "moe_tail":
        problems.append("init_weights cannot fill backbone blocks that quantize_frozen has already quantized; "
                        "start from backbone.init_args.pretrained_path instead, or set quantize_frozen: null")
    if problems:
        raise ValueError("TagMoEModule: " + "; ".join(problems) + ".")


def settle_parameters(module: TagMoEModule, sharded: bool) -> None:
    """Freeze what cannot or must not learn, store frozen parts in 8/4 bits if asked, attach LoRA
    adapters: the backbone is frozen before quantization looks for frozen blocks, and adapters go on
    after it, onto the quantized layers (QLoRA)."""
    from tagmoe_lit.lora import apply_lora
    from tagmoe_lit.quantize import quantize_frozen

    freeze_unreachable(module.backbone.dead_ends())
    if module.trainable == "moe_tail":
        train_only_moe_tail(module, module.moe_layers, [module.tag_embedder, module.head])
    elif module.lora is not None:
        module.backbone.requires_grad_(False)
    if module.quantize_frozen:
        quantize_frozen(module.quantize_frozen, module.text_encoder, module.backbone, module.trainable, sharded,
                        lora=module.lora is not None)
    if module.lora is not None:
        apply_lora(module.backbone, module.lora)
