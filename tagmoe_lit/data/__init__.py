"""Data: the SynthTAG generator and DataModule, JSONL manifest data, prompt lists (the encoders' disk
caches are model components: `tagmoe_lit.backbone.CachedTextEncoder` / `CachedCodec`)."""

from tagmoe_lit.data.datamodule import SynthTAGDataModule
from tagmoe_lit.data.manifest import ManifestError
from tagmoe_lit.data.manifest_datamodule import ManifestDataModule
from tagmoe_lit.data.prompts import PromptListDataset, PromptListError
from tagmoe_lit.data.synthtag import TASKS, SynthSample, SynthTAG

__all__ = [
    "TASKS",
    "ManifestDataModule",
    "ManifestError",
    "PromptListDataset",
    "PromptListError",
    "SynthSample",
    "SynthTAG",
    "SynthTAGDataModule",
]
