"""Lightning callbacks that watch TAG-MoE routing; they read only the module's published `RoutingStats`."""

from callbacks.expert_load import ExpertLoadMonitor

__all__ = ["ExpertLoadMonitor"]
