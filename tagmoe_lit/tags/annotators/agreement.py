"""Agreement between two annotations of the same rows: per-level precision / recall / F1 and confusion.

`reference` plays ground truth (e.g. SynthTAG's tags, or a person's), `candidate` is scored against
it (e.g. rules or the VLM). Scores are micro-averaged over a level's tags: a true positive is a tag
both gave the row. The confusion table of a level counts, per row, each tag both gave on the
diagonal, and each tag only the reference gave against each tag only the candidate gave (or
against "(none)" when one side gave nothing more) — for one-tag levels such as Scope it is the
usual confusion matrix.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from tagmoe_lit.tags.schema import TagSchema

NONE = "(none)"
Tags = Iterable[str] | Mapping[str, Iterable[str]]


@dataclass
class Scores:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


@dataclass
class AgreementReport:
    schema: TagSchema
    rows: int
    levels: dict[str, Scores]
    tags: dict[str, Scores]
    confusion: dict[str, Counter] = field(default_factory=dict)  # level → Counter[(reference, candidate)]
    exact: int = 0  # rows whose tag sets are identical on every level

    def format(self) -> str:
        """A plain-text report: per-level scores, per-tag scores, and each level's confusion table."""
        share = self.exact / max(1, self.rows)
        out = [f"Agreement on {self.rows} rows (schema {self.schema.name}); identical tag sets: {self.exact} ({share:.1%})", ""]
        out.append(f"{'level':<24}{'precision':>10}{'recall':>10}{'F1':>10}{'tp':>8}{'fp':>8}{'fn':>8}")
        for level, s in self.levels.items():
            out.append(f"{level:<24}{s.precision:>10.3f}{s.recall:>10.3f}{s.f1:>10.3f}{s.tp:>8}{s.fp:>8}{s.fn:>8}")
        out += ["", f"{'tag':<28}{'precision':>10}{'recall':>10}{'F1':>10}{'support':>9}"]
        for tag, s in self.tags.items():
            out.append(f"{tag:<28}{s.precision:>10.3f}{s.recall:>10.3f}{s.f1:>10.3f}{s.tp + s.fn:>9}")
        for level, table in self.confusion.items():
            names = [*self.schema.levels[level], NONE]
            width = max(len(n) for n in names) + 2
            out += ["", f"confusion '{level}' (rows: reference, columns: candidate)", " " * width + "".join(f"{n[:12]:>14}" for n in names)]
            for r in names:
                out.append(f"{r:<{width}}" + "".join(f"{table.get((r, c), 0):>14}" for c in names))
        return "\n".join(out)


def _by_level(tags: Tags, schema: TagSchema) -> dict[str, set[str]]:
    return {level: set(names) for level, names in schema.decode(schema.encode(tags)).items()}


def agreement(reference: Sequence[Tags], candidate: Sequence[Tags], schema: TagSchema) -> AgreementReport:
    """Score `candidate` against `reference`, row by row (same length and order)."""
    if len(reference) != len(candidate):
        raise ValueError(f"agreement needs the same rows on both sides; got {len(reference)} reference and {len(candidate)} candidate rows.")
    levels = {level: Scores() for level in schema.levels}
    per_tag = {tag: Scores() for tag in schema.names}
    confusion = {level: Counter() for level in schema.levels}
    exact = 0
    for ref_tags, cand_tags in zip(reference, candidate):
        ref, cand = _by_level(ref_tags, schema), _by_level(cand_tags, schema)
        exact += ref == cand
        for level in schema.levels:
            r, c = ref[level], cand[level]
            for tag in r & c:
                levels[level].tp += 1
                per_tag[tag].tp += 1
                confusion[level][tag, tag] += 1
            for tag in c - r:
                levels[level].fp += 1
                per_tag[tag].fp += 1
            for tag in r - c:
                levels[level].fn += 1
                per_tag[tag].fn += 1
            only_r, only_c = sorted(r - c) or ([NONE] if c - r or not r else []), sorted(c - r) or ([NONE] if r - c or not c else [])
            for a in only_r:
                for b in only_c:
                    confusion[level][a, b] += 1
    return AgreementReport(schema, len(reference), levels, per_tag, confusion, exact)
