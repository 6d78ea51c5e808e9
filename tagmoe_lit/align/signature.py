"""The routing signature g: what the router did for one sample, as a point on the E-simplex.

g = router probabilities over *all* experts (not only the top-1), averaged over the sample's counted
tokens (per layer, in `LayerRouting.signature_BE`) and then over the MoE layers. It keeps its
gradient: the alignment loss trains the routers through it.
"""

from __future__ import annotations

import torch

from tagmoe_lit.moe.stats import RoutingStats


def routing_signature(stats: RoutingStats) -> torch.Tensor:
    """[B, E] mean over MoE layers of per-sample mean router probabilities."""
    return torch.stack([layer.signature_BE for layer in stats.layers]).mean(0)
