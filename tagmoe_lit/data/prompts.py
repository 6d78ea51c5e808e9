"""Prompt lists for `predict`: instructions (and optional source images) to generate from.

A prompt list is a JSONL file (one object per line) or a YAML list of objects:

    - instruction: make the red circle blue
      source: inputs/scene.png        # optional, relative to the list file; a list uses its first path
      tags: [local editing]           # optional (only the tag-conditioned oracle router reads tags)
      name: red_to_blue               # optional file stem for outputs (default: the row number, 00000)

`source` absent, null or an empty list means no source, as in manifests (`manifest.first_source`).
Names must be distinct, a default name included: an entry named "00003" clashes with the fourth
entry when that one has no name.

Items follow the training batch contract so the module's `predict_step` takes them unchanged:
`source` is the image fitted into the aspect-ratio bucket nearest its shape within
image_size² pixels, sides multiples of `multiple` (a square source of image_size stays as it is); `target` is zeros of that size
(image_size square without a source) and only fixes the output size; `mask` is all True; `tags`
is all zeros when absent; `task` is -1 (unknown); `index` is the row number; `name` a safe stem.
Use `batches` (or `prompt_loader`) so that every batch holds one image size.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from tagmoe_lit.data.bucket_sampler import FixedBatchSampler, eval_batches
from tagmoe_lit.data.buckets import aspect_buckets, nearest_bucket
from tagmoe_lit.data.images import ImageReadError, load_image, probe_size
from tagmoe_lit.data.manifest import first_source
from tagmoe_lit.tags import TagSchema, TagSchemaError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class PromptListError(ValueError):
    """A prompt list or one of its entries is unusable; the message names the file and the entry."""


def _entries(path: Path) -> list[tuple[str, object]]:
    """(location, raw entry) pairs from a JSONL file or a YAML list."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PromptListError(f"Prompt list {path} is not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8.") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise PromptListError(f"Prompt list {path} is not valid YAML ({err}); write a YAML list of entries.") from None
        if not isinstance(data, list):
            raise PromptListError(f"Prompt list {path} must be a YAML list of entries with an 'instruction' each.")
        return [(f"{path} entry {i}", entry) for i, entry in enumerate(data)]
    entries = []
    for n, line in enumerate(text.split("\n"), 1):  # only "\n" ends a line: JSON strings may hold U+2028
        if line.strip():
            try:
                entries.append((f"{path} line {n}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise PromptListError(f"{path} line {n} is not valid JSON ({err.msg}); fix or remove the line.") from None
    return entries


class PromptListDataset(Dataset):
    """Items of a prompt list in the training batch format, plus `name`."""

    def __init__(
        self, path: str | Path, image_size: int, schema: TagSchema | str, multiple: int | None = None, max_aspect: float = 2.0
    ):
        """
        Args:
            path: JSONL or YAML prompt list; relative source paths are read from its folder.
            image_size: side of text-to-image outputs; sources are fitted within image_size² pixels.
            schema: tag schema for the optional tags.
            multiple: bucket sides are multiples of this; it must divide image_size (default: gcd(image_size, 16)).
            max_aspect: most extreme aspect ratio of a bucket (longer side / shorter side).
        """
        self.path = Path(path)
        if not self.path.is_file():
            raise PromptListError(f"Prompt list '{path}' does not exist; pass a JSONL or YAML file of {{instruction, source?, tags?}} entries.")
        multiple = multiple if multiple is not None else math.gcd(image_size, 16)
        if multiple < 1 or image_size % multiple:
            raise ValueError(f"Prompt lists need image_size ({image_size}) to be a multiple of the bucket multiple ({multiple}).")
        self.schema = TagSchema.load(schema) if isinstance(schema, str) else schema
        self.image_size = image_size
        self.buckets = aspect_buckets(image_size * image_size, multiple, max_aspect)
        self.items = []
        named: dict[str, str] = {}  # name → the entry that has it
        for row, (where, entry) in enumerate(_entries(self.path)):
            item = self._parse(where, entry, row)
            if item["name"] in named:
                raise PromptListError(
                    f"{where}: name {item['name']!r} is also the name of {named[item['name']]}; give every entry a distinct "
                    "'name' (an entry without one is named by its row number, 00000, 00001, …)."
                )
            named[item["name"]] = where
            self.items.append(item)
        if not self.items:
            raise PromptListError(f"Prompt list {self.path} has no entries; add at least one {{instruction: ...}}.")

    def _parse(self, where: str, entry, row: int) -> dict:
        def fail(problem: str):
            raise PromptListError(f"{where}: {problem}.")

        if not isinstance(entry, dict):
            fail("each entry must be a mapping with an 'instruction'")
        instruction = entry.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            fail(f"'instruction' must be a non-empty string, got {instruction!r}")
        try:
            source_value = first_source(entry.get("source"))
        except ValueError as err:
            fail(str(err))
        size = (self.image_size, self.image_size)
        source = None
        if source_value is not None:
            if not isinstance(source_value, str) or not source_value:
                fail(f"'source' must be a non-empty image path, got {source_value!r}")
            source = self.path.parent / source_value
            if not source.is_file():
                fail(f"source image '{source_value}' does not exist (looked for {source})")
            try:
                size = nearest_bucket(*probe_size(source), self.buckets)
            except ImageReadError as err:
                fail(f"source image '{source}' {err}")
        tags = torch.zeros(self.schema.num_tags)
        if entry.get("tags") is not None:
            try:
                tags = self.schema.multi_hot(self.schema.encode(entry["tags"]))
            except (TagSchemaError, TypeError) as err:
                fail(str(err).rstrip("."))
        name = entry.get("name", f"{row:05d}")
        if not isinstance(name, str) or not _SAFE_NAME.match(name):
            fail(f"'name' {name!r} is not a safe file stem (letters, digits, '.', '_', '-'; at most 128)")
        return {"instruction": instruction, "source": source, "size": size, "tags": tags, "name": name, "where": where}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        H, W = item["size"]
        if item["source"] is not None:
            try:
                source = load_image(item["source"], (H, W))
            except ImageReadError as err:
                raise PromptListError(f"{item['where']}: source image '{item['source']}' {err}.") from None
        else:
            source = torch.zeros(3, H, W)
        return {
            "instruction": item["instruction"],
            "source": source,
            "has_source": item["source"] is not None,
            "target": torch.zeros(3, H, W),
            "mask": torch.ones(H, W, dtype=torch.bool),
            "tags": item["tags"],
            "task": -1,
            "index": i,
            "name": item["name"],
        }

    def batches(self, batch_size: int) -> list[list[int]]:
        """Batches of item indices, each of one image size (file order within a size)."""
        return eval_batches([item["size"] for item in self.items], batch_size)


def prompt_loader(
    path: str | Path, image_size: int, schema: TagSchema | str, batch_size: int, num_workers: int = 0,
    multiple: int | None = None, max_aspect: float = 2.0,
) -> DataLoader:
    """A DataLoader over a prompt list whose batches each hold one image size (see `PromptListDataset` for the rest)."""
    dataset = PromptListDataset(path, image_size, schema, multiple, max_aspect)
    return DataLoader(dataset, batch_sampler=FixedBatchSampler(dataset.batches(batch_size)), num_workers=num_workers)
