r"""Hierarchical task-tag schemas (Scope / Type / Preservation), loaded from YAML.

A schema fixes the tag vocabulary and each tag's integer id. Ids are the rows of the tag-embedding
table, so they are part of a checkpoint's identity: `fingerprint` names a schema's exact vocabulary
and checkpoints refuse to load under another one. Shipped schemas live in `tags/schemas/`; a user
adds a schema by writing a new YAML file and pointing `--model.schema` at its path.

A schema may also declare `rules`: per tag, the instruction patterns (regular expressions, matched
case-insensitively) and conditions under which `tags.annotators.RuleAnnotator` gives that tag, so a
new schema brings its own rule annotator. Rules do not enter the fingerprint: they describe how
tags are *assigned*, not how they are embedded.

    rules:
      image generation: {source: absent}            # every row without a source image
      object removal: ['\b(remove|delete|erase)\b']    # a bare list is `match`
      background preservation: {implied_by: [local editing], unless: ['\bbackground\b']}
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
import yaml

SCHEMA_DIR = Path(__file__).parent / "schemas"
_ALLOWED_KEYS = {"name", "levels", "rules"}
_RULE_KEYS = ("match", "unless", "implied_by", "source")
SOURCE_CONDITIONS = ("any", "present", "absent")


class TagSchemaError(ValueError):
    """A schema file or a sample's tags do not follow the rules; the message says how to fix it."""


def shipped_schemas() -> list[str]:
    """Names of the schemas that ship with the kit (usable as `schema: <name>`)."""
    return sorted(p.stem for p in SCHEMA_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class TagRule:
    """When the rule annotator gives a tag.

    The tag is given when (a `match` pattern is found in the instruction, or the row already got a
    tag listed in `implied_by`), and the row's source image is as `source` says (`present`,
    `absent` or `any`), and no `unless` pattern is found. A rule with neither `match` nor
    `implied_by` fires on its `source` condition alone. Patterns are Python regular expressions
    searched case-insensitively.
    """

    match: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()
    implied_by: tuple[str, ...] = ()
    source: str = "any"


def _as_patterns(value, what: str, problems: list[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{what} must be a list of non-empty strings, got {value!r}")
        return ()
    return tuple(value)


def _parse_rules(raw, problems: list[str]) -> dict[str, TagRule]:
    """YAML `rules:` → {tag: TagRule}; type problems go to `problems` (checked against the levels later)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append("'rules' must map tag names to a list of patterns or to a mapping with keys " + str(list(_RULE_KEYS)))
        return {}
    rules = {}
    for tag, spec in raw.items():
        if isinstance(spec, (list, str)):
            spec = {"match": spec}
        if not isinstance(spec, dict):
            problems.append(f"rule for '{tag}' must be a list of patterns or a mapping with keys {list(_RULE_KEYS)}")
            continue
        unknown = sorted(set(spec) - set(_RULE_KEYS))
        if unknown:
            problems.append(f"rule for '{tag}' has unknown keys {unknown}; allowed: {list(_RULE_KEYS)}")
            continue
        source = spec.get("source", "any")
        if source not in SOURCE_CONDITIONS:
            problems.append(f"rule for '{tag}' has source {source!r}; use one of {list(SOURCE_CONDITIONS)}")
            continue
        rules[str(tag)] = TagRule(
            match=_as_patterns(spec.get("match", []), f"rule '{tag}': match", problems),
            unless=_as_patterns(spec.get("unless", []), f"rule '{tag}': unless", problems),
            implied_by=_as_patterns(spec.get("implied_by", []), f"rule '{tag}': implied_by", problems),
            source=source,
        )
    return rules


@dataclass(frozen=True)
class TagSchema:
    """Ordered levels, each an ordered mapping tag name → fixed id; ids are exactly 0..N-1."""

    name: str
    levels: dict[str, dict[str, int]]
    source: str = "<memory>"
    rules: dict[str, TagRule] = field(default_factory=dict)

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
        problems += self._rule_problems(seen_name)
        if problems:
            raise TagSchemaError(f"Tag schema {self.source}: " + "; ".join(problems)
                                 + "; fix the schema (every level non-empty, each tag one unique id, ids 0..N-1 without gaps).")

    def _rule_problems(self, known: Mapping[str, str]) -> list[str]:
        problems = []
        for tag, rule in self.rules.items():
            if tag not in known:
                problems.append(f"rule for unknown tag '{tag}' (valid tags: {list(known)})")
            unknown = [t for t in rule.implied_by if t not in known]
            if unknown:
                problems.append(f"rule '{tag}': implied_by names unknown tags {unknown}")
            if not rule.match and not rule.implied_by and rule.source == "any":
                problems.append(f"rule '{tag}' has no match, implied_by or source condition, so it would tag every row")
            for pattern in (*rule.match, *rule.unless):
                try:
                    re.compile(pattern)
                except re.error as err:
                    problems.append(f"rule '{tag}': pattern {pattern!r} is not a valid regular expression ({err})")
        return problems

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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "levels" not in data:
            raise TagSchemaError(f"Tag schema {path}: expected a mapping with keys 'name' and 'levels'.")
        unknown = set(data) - _ALLOWED_KEYS
        if unknown:
            raise TagSchemaError(f"Tag schema {path}: unknown keys {sorted(unknown)}; allowed: {sorted(_ALLOWED_KEYS)}.")
        levels = data["levels"]
        if not isinstance(levels, dict):
            raise TagSchemaError(f"Tag schema {path}: 'levels' must map level names to {{tag: id}} mappings.")
        problems: list[str] = []
        rules = _parse_rules(data.get("rules"), problems)
        if problems:
            raise TagSchemaError(f"Tag schema {path}: " + "; ".join(problems) + ".")
        return cls(
            name=str(data.get("name", path.stem)),
            levels={str(k): dict(v or {}) for k, v in levels.items()},
            source=str(path),
            rules=rules,
        )

    # -- vocabulary --------------------------------------------------------------------------
    @property
    def num_tags(self) -> int:
        return sum(len(t) for t in self.levels.values())

    @property
    def names(self) -> list[str]:
        """Tag names ordered by id."""
        by_id = {i: n for tags in self.levels.values() for n, i in tags.items()}
        return [by_id[i] for i in range(self.num_tags)]

    @property
    def scope_level(self) -> str:
        """The first level: the one every sample should have a tag on (Scope in both shipped schemas)."""
        return next(iter(self.levels))

    def decode(self, ids: Iterable[int]) -> dict[str, list[str]]:
        """Ids → {level: [tag names]} for every level (empty lists included), tags in id order."""
        wanted = set(ids)
        return {level: [t for t, i in sorted(tags.items(), key=lambda kv: kv[1]) if i in wanted] for level, tags in self.levels.items()}

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
