"""Data: the SynthTAG generator and DataModule, JSONL manifest data, prompt lists, disk caches."""

from tagmoe_lit.data.cached_encoders import CachedCodec, CachedTextEncoder
from tagmoe_lit.data.datamodule import SynthTAGDataModule
from tagmoe_lit.data.manifest import ManifestError
from tagmoe_lit.data.manifest_datamodule import ManifestDataModule
from tagmoe_lit.data.prompts import PromptListDataset, PromptListError
from tagmoe_lit.data.synthtag import TASKS, SynthSample, SynthTAG

__all__ = [
    "TASKS",
    "CachedCodec",
    "CachedTextEncoder",
    "ManifestDataModule",
    "ManifestError",
    "PromptListDataset",
    "PromptListError",
    "SynthSample",
    "SynthTAG",
    "SynthTAGDataModule",
]
