"""What every annotator takes and returns: a request (instruction + source images) and an annotation.

An annotator is any object with a `name`, the `schema` it tags for, and
`annotate(requests) -> annotations` (one per request, same order). The annotation keeps the
annotator's raw answer next to the parsed tags, so a person can audit why a row got its tags, and a
`problem` when the row should not be trusted (no scope tag, an answer outside the vocabulary): the
data modules refuse flagged rows unless told to skip them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from tagmoe_lit.tags.schema import TagSchema


@dataclass(frozen=True)
class AnnotationRequest:
    """One row to tag. `sources` are the row's source images (empty: text-to-image)."""

    instruction: str
    sources: tuple[Path, ...] = ()
    where: str = ""  # "manifest.jsonl line 7", for messages


@dataclass(frozen=True)
class Annotation:
    """Tags per level (every level present, tags in id order), the raw answer, and a problem or None."""

    tags: dict[str, list[str]]
    raw: Any  # JSON-serializable
    problem: str | None = None


class Annotator(Protocol):
    name: str
    schema: TagSchema

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]: ...
