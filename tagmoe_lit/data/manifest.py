"""JSONL manifests: one training sample per line, validated up front.

A row:

    {"instruction": "make the red circle blue",          # required, non-empty
     "target": "images/0001_target.png",                 # required
     "source": "images/0001_source.png",                 # optional: a path or a list (only the first is used)
     "mask": "images/0001_mask.png",                     # optional: white = may change (default: all)
     "tags": {"scope": ["local editing"], ...},          # names from the schema, or a flat list
     "task": "recolor"}                                  # optional task name for per-task metrics

Paths are relative to the manifest's folder (absolute paths work too). `source` absent, null or
an empty list all mean no source (text-to-image); of a list only the first path is used (by
training, `annotate` and prompt lists alike) and the others are not checked. An optional
`split_key` string replaces the target path in the split hash (below). Other keys are kept and
ignored (`annotate` adds `annotation`). A row `annotate` flagged (`annotation.problem`) is a bad
row.

Task names: a row's `task` if given, else its tag set written as "tag+tag+…" in id order, so rows
with the same tags count as one task in the per-task metrics ("untagged" when it has none).

The split is by a hash of (instruction, split key), not of the line. The split key is the row's
`split_key` if it has one, else its target path relative to the manifest's folder, normalized
(`relative_path`: `./images//a.png` and the absolute spelling of the same file give `images/a.png`).
So the split stays the same when rows are reordered, added to, or annotated, when the folder of
manifest and images moves, and does not depend on the seed. `annotate` writing its output to
another folder rewrites the image paths and records the original key as `split_key`, so the split
survives that too. Renaming a target file (of a row without `split_key`) moves its row.

Everything that can be checked without decoding whole images is checked when the manifest is read:
JSON, instruction, tags against the schema, that every file exists, and the target's header (which
also gives its size for bucketing). Each problem is reported as "<file> line <n>: <problem>".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tagmoe_lit.data.images import ImageReadError, probe_size
from tagmoe_lit.io import relative_path
from tagmoe_lit.tags import TagSchema, TagSchemaError


class ManifestError(ValueError):
    """A manifest or one of its rows is unusable; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class ManifestRow:
    manifest: Path
    line: int
    instruction: str
    target: Path
    source: Path | None
    mask: Path | None
    tag_ids: tuple[int, ...]
    task: str
    size: tuple[int, int]  # the target's (height, width)
    split_hash: float  # in [0, 1): the row is in validation when below val_fraction

    @property
    def where(self) -> str:
        return f"{self.manifest} line {self.line}"


@dataclass(frozen=True)
class BadRow:
    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


def task_of(row_task: str | None, tag_ids: tuple[int, ...], schema: TagSchema) -> str:
    if row_task:
        return row_task
    names = [schema.names[i] for i in sorted(tag_ids)]
    return "+".join(names) if names else "untagged"


def split_hash(instruction: str, split_key: str) -> float:
    """In [0, 1), uniform over rows: a hash of the instruction and the row's split key (see the module doc)."""
    digest = hashlib.sha256(f"{instruction}\0{split_key}".encode()).hexdigest()
    return int(digest[:13], 16) / 16**13


def first_source(value) -> str | None:
    """A row's `source` value → the path used, or None for no source (absent, null or an empty list)."""
    if isinstance(value, list):
        return value[0] if value else None
    if value is not None and not isinstance(value, str):
        raise ValueError(f"'source' must be a path or a list of paths, got {value!r}")
    return value


def _path(folder: Path, value, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"'{key}' must be a non-empty path string, got {value!r}")
    path = folder / value
    if not path.is_file():
        raise ValueError(f"{key} image '{value}' does not exist (looked for {path})")
    return path


def parse_row(row, manifest: Path, line: int, schema: TagSchema, require_tags: bool) -> ManifestRow:
    """One decoded JSON value → ManifestRow; raises ValueError with the problem (no location)."""
    if not isinstance(row, dict):
        raise ValueError("the line must be a JSON object with at least 'instruction' and 'target'")
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"'instruction' must be a non-empty string, got {instruction!r}")
    annotation = row.get("annotation")
    problem = annotation.get("problem") if isinstance(annotation, dict) else None
    if problem:
        raise ValueError(f"the annotator flagged it ({problem})")
    if "target" not in row:
        raise ValueError("it has no 'target' image path")
    folder = manifest.parent
    target = _path(folder, row["target"], "target")
    source_value = first_source(row.get("source"))
    source = _path(folder, source_value, "source") if source_value is not None else None
    mask = _path(folder, row["mask"], "mask") if row.get("mask") is not None else None
    tags = row.get("tags")
    if tags is None:
        if require_tags:
            raise ValueError("it has no 'tags' (annotate the manifest first, or set require_tags: false to train it untagged)")
        tag_ids: tuple[int, ...] = ()
    else:
        if not isinstance(tags, (list, dict)):
            raise ValueError(f"'tags' must be a list of tag names or a {{level: [names]}} mapping, got {tags!r}")
        try:
            tag_ids = tuple(sorted(set(schema.encode(tags))))
        except (TagSchemaError, TypeError) as err:
            raise ValueError(str(err).rstrip(".")) from None
        if require_tags and not tag_ids:
            raise ValueError("its 'tags' are empty (annotate it, or set require_tags: false to train it untagged)")
    task = row.get("task")
    if task is not None and (not isinstance(task, str) or not task):
        raise ValueError(f"'task' must be a non-empty string, got {task!r}")
    split_key = row["split_key"] if "split_key" in row else relative_path(row["target"], folder)
    if not isinstance(split_key, str) or not split_key:
        raise ValueError(f"'split_key' must be a non-empty string, got {split_key!r}")
    try:
        size = probe_size(target)
    except ImageReadError as err:
        raise ValueError(f"target image '{row['target']}' {err}") from None
    return ManifestRow(
        manifest, line, instruction, target, source, mask, tag_ids, task_of(task, tag_ids, schema), size,
        split_hash(instruction, split_key),
    )


def read_manifest(path: str | Path, schema: TagSchema, require_tags: bool = True) -> tuple[list[ManifestRow], list[BadRow]]:
    """All good rows of a manifest, and the bad ones with their problem (the caller raises or skips)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"Manifest '{path}' does not exist; pass the path of a JSONL file (one sample per line).")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # only "\n" ends a line: JSON strings may hold U+2028
    except UnicodeDecodeError as err:
        raise ManifestError(f"Manifest {path} is not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8.") from None
    rows, bad = [], []
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            rows.append(parse_row(json.loads(text), path, n, schema, require_tags))
        except json.JSONDecodeError as err:
            bad.append(BadRow(f"{path} line {n}", f"not valid JSON ({err.msg})"))
        except ValueError as err:
            bad.append(BadRow(f"{path} line {n}", str(err)))
    return rows, bad
