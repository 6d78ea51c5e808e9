"""Mixture-of-experts core: routers, stacked experts, the dropless layer, balancing, stats."""

from tagmoe_lit.moe.experts import StackedExperts
from tagmoe_lit.moe.layer import MoELayer
from tagmoe_lit.moe.losses import load_balancing_loss, router_z_loss
from tagmoe_lit.moe.routers import AuxFreeBiasRouter, LinearRouter, MLPRouter, NoisyTopKRouter, TagConditionedRouter
from tagmoe_lit.moe.stats import LayerRouting, RoutingRecord, RoutingStats
from tagmoe_lit.moe.upcycle import upcycle_

__all__ = [
    "AuxFreeBiasRouter",
    "NoisyTopKRouter",
    "TagConditionedRouter",
    "LayerRouting",
    "LinearRouter",
    "MLPRouter",
    "MoELayer",
    "RoutingRecord",
    "RoutingStats",
    "StackedExperts",
    "load_balancing_loss",
    "router_z_loss",
    "upcycle_",
]
