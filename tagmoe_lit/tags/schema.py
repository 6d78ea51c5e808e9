"""Hierarchical task-tag schemas (Scope / Type / Preservation), loaded from YAML.

A schema fixes the tag vocabulary and each tag's integer id. Ids are the rows of the tag-embedding
table, so they are part of a checkpoint's identity: `fingerprint` names a schema's exact vocabulary
and checkpoints refuse to load under another one. Shipped schemas live in `tags/schemas/`; a user
adds a schema by writing a new YAML file and pointing `--model.schema` at its path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
import yaml

SCHEMA_DIR = Path(__file__).parent / "schemas"
_ALLOWED_KEYS = {"name", "levels"}


class TagSchemaError(ValueError):
    """A schema file or a sample's tags do not follow the rules; the message says how to fix it."""


def shipped_schemas() -> list[str]:
    """Names of the schemas that ship with the kit (usable as `schema: <name>`)."""
    return sorted(p.stem for p in SCHEMA_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class TagSchema:
    """Ordered levels, each an ordered mapping tag name → fixed id; ids are exactly 0..N-1."""

    name: str
    levels: dict[str, dict[str, int]]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.levels:
            problems.append("it declares no levels")
        seen_name: dict[str, str] = {}
        seen_id: dict[int, str] = {}
        for level, tags in self.levels.items():
            if not isinstance(tags, Mapping) or not tags:
                problems.append(f"level '{level}' must map tag names to integer ids and not be empty")
                continue
            for tag, tag_id in tags.items():
                if not isinstance(tag_id, int) or isinstance(tag_id, bool) or tag_id < 0:
                    problems.append(f"tag '{tag}' has id {tag_id!r}; ids are non-negative integers")
                    continue
                if tag in seen_name:
                    problems.append(f"tag '{tag}' appears in levels '{seen_name[tag]}' and '{level}'")
                if tag_id in seen_id:
                    problems.append(f"id {tag_id} is used by both '{seen_id[tag_id]}' and '{tag}'")
                seen_name[tag], seen_id[tag_id] = level, tag
        missing = sorted(set(range(len(seen_id))) - set(seen_id))
        if seen_id and missing:
            problems.append(f"ids must be 0..{len(seen_id) - 1} without gaps; missing {missing}")
        if problems:
            raise TagSchemaError(f"Tag schema {self.source}: " + "; ".join(problems) + ".")

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | Path) -> "TagSchema":
        """Load a shipped schema by name (e.g. `official18`) or any schema YAML by path."""
        path = Path(name_or_path)
        if not path.suffix:
            path = SCHEMA_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise TagSchemaError(
                f"Tag schema '{name_or_path}' not found: pass one of {shipped_schemas()} "
                "or the path of a schema YAML file."
            )
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict) or "levels" not in data:
            raise TagSchemaError(f"Tag schema {path}: expected a mapping with keys 'name' and 'levels'.")
        unknown = set(data) - _ALLOWED_KEYS
        if unknown:
            raise TagSchemaError(f"Tag schema {path}: unknown keys {sorted(unknown)}; allowed: {sorted(_ALLOWED_KEYS)}.")
        levels = data["levels"]
        if not isinstance(levels, dict):
            raise TagSchemaError(f"Tag schema {path}: 'levels' must map level names to {{tag: id}} mappings.")
        return cls(name=str(data.get("name", path.stem)), levels={str(k): dict(v or {}) for k, v in levels.items()}, source=str(path))

    # -- vocabulary --------------------------------------------------------------------------
    @property
    def num_tags(self) -> int:
        return sum(len(t) for t in self.levels.values())

    @property
    def names(self) -> list[str]:
        """Tag names ordered by id."""
        by_id = {i: n for tags in self.levels.values() for n, i in tags.items()}
        return [by_id[i] for i in range(self.num_tags)]

    def level_of(self, tag: str) -> str:
        for level, tags in self.levels.items():
            if tag in tags:
                return level
        raise TagSchemaError(f"Unknown tag '{tag}' for schema {self.name} ({self.source}); valid tags: {self.names}.")

    @property
    def fingerprint(self) -> str:
        """Short hash of (level, tag, id) triples: equal iff two schemas embed tags identically."""
        items = sorted((lvl, tag, i) for lvl, tags in self.levels.items() for tag, i in tags.items())
        return hashlib.sha256(repr(items).encode()).hexdigest()[:16]

    def encode(self, tags: Iterable[str] | Mapping[str, Iterable[str]]) -> list[int]:
        """Tag names → ids. A mapping {level: [tags]} is also checked for tags filed under the wrong level."""
        if isinstance(tags, Mapping):
            ids = []
            for level, names in tags.items():
                if level not in self.levels:
                    raise TagSchemaError(
                        f"Unknown tag level '{level}' for schema {self.name}; valid levels: {list(self.levels)}."
                    )
                for tag in names:
                    actual = self.level_of(tag)
                    if actual != level:
                        raise TagSchemaError(
                            f"Tag '{tag}' is filed under level '{level}' but schema {self.name} puts it in "
                            f"'{actual}'; valid '{level}' tags: {list(self.levels[level])}."
                        )
                    ids.append(self.levels[level][tag])
            return ids
        return [self.levels[self.level_of(tag)][tag] for tag in tags]

    def multi_hot(self, ids: Iterable[int]) -> torch.Tensor:
        """Ids → float multi-hot vector [num_tags] (what the tag embedder sums over)."""
        vec = torch.zeros(self.num_tags)
        vec[list(ids)] = 1.0
        return vec
