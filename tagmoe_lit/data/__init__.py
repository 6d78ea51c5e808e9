"""Data: the SynthTAG procedural generator and its DataModule."""

from tagmoe_lit.data.datamodule import SynthTAGDataModule
from tagmoe_lit.data.synthtag import TASKS, SynthSample, SynthTAG

__all__ = ["TASKS", "SynthSample", "SynthTAG", "SynthTAGDataModule"]
