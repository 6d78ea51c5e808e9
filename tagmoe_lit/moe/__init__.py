"""Mixture-of-experts core: routers, stacked experts, the dropless layer, balancing, stats."""

from tagmoe_lit.moe.experts import StackedExperts
from tagmoe_lit.moe.layer import MoELayer
from tagmoe_lit.moe.losses import load_balancing_loss
from tagmoe_lit.moe.routers import LinearRouter, MLPRouter
from tagmoe_lit.moe.stats import LayerRouting, RoutingStats
from tagmoe_lit.moe.upcycle import upcycle_

__all__ = [
    "LayerRouting",
    "LinearRouter",
    "MLPRouter",
    "MoELayer",
    "RoutingStats",
    "StackedExperts",
    "load_balancing_loss",
    "upcycle_",
]
