"""Lightning callbacks that watch TAG-MoE routing and samples.

They read only what the module publishes: the `RoutingRecord` in `pl_module.routing` and images
from `pl_module.generate`. `RoutingSignatureMonitor` and `SpecializationMonitor` share the
validation-set collection of `RoutingCollector`. `LearningRateMonitor` is Lightning's, stepping
aside without a logger; `ProgressLines` prints plain progress lines when stdout is not a terminal.
"""

from callbacks.expert_load import ExpertLoadMonitor
from callbacks.lr_monitor import LearningRateMonitor
from callbacks.prediction_writer import PredictionWriter
from callbacks.progress_lines import ProgressLines
from callbacks.routing_collector import RoutingCollector, ValidationRouting
from callbacks.routing_signature import RoutingSignatureMonitor
from callbacks.sample_grid import SampleGrid
from callbacks.specialization import SpecializationMonitor

__all__ = [
    "ExpertLoadMonitor",
    "LearningRateMonitor",
    "PredictionWriter",
    "ProgressLines",
    "RoutingCollector",
    "RoutingSignatureMonitor",
    "SampleGrid",
    "SpecializationMonitor",
    "ValidationRouting",
]
