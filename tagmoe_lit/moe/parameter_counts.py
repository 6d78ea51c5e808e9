"""Total vs active parameters: what a token pays for and what the model stores.

An MoE layer stores all E experts but a token runs only K of them, so its active parameters are
K/E of the experts plus the whole router. Works on meta-device models (only `numel` is read).
"""

from __future__ import annotations

from torch import nn

from tagmoe_lit.moe.layer import MoELayer


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(model: nn.Module) -> dict:
    """{"total", "active", "trainable", "layers": [{"name", "total", "active"}, …]} for every MoE layer in `model`
    (trainable: parameters that get gradients, e.g. only LoRA adapters)."""
    total, inactive, layers = _numel(model), 0, []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            experts, router = _numel(module.experts), _numel(module.router)
            active = experts * module.top_k // module.num_experts + router
            layers.append({"name": name, "total": experts + router, "active": active})
            inactive += experts + router - active
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "active": total - inactive, "trainable": trainable, "layers": layers}
