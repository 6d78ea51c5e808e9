"""Lightning callbacks that watch TAG-MoE routing and samples.

They read only what the module publishes: the `RoutingRecord` in `pl_module.routing` and images
from `pl_module.generate`. `RoutingSignatureMonitor` and `SpecializationMonitor` share the
validation-set collection of `RoutingCollector`.
"""

from callbacks.expert_load import ExpertLoadMonitor
from callbacks.prediction_writer import PredictionWriter
from callbacks.routing_collector import RoutingCollector, ValidationRouting
from callbacks.routing_signature import RoutingSignatureMonitor
from callbacks.sample_grid import SampleGrid
from callbacks.specialization import SpecializationMonitor

__all__ = [
    "ExpertLoadMonitor",
    "PredictionWriter",
    "RoutingCollector",
    "RoutingSignatureMonitor",
    "SampleGrid",
    "SpecializationMonitor",
    "ValidationRouting",
]
