"""`RuleAnnotator`: tags from the schema's own keyword/regex rules; deterministic and fast.

Each tag's `TagRule` (declared under `rules:` in the schema YAML, see `tags/schema.py`) says which
instruction patterns give it, which veto it, whether the row must (not) have a source image, and
which other tags imply it. Rules are applied until nothing changes, so `implied_by` chains in any
order. The raw answer records, per tag, the pattern or the implying tag that fired. A row that gets
no tag on the schema's first level (Scope) is flagged: training on it would teach nothing about its
task, and it usually means the rules miss a phrasing that should be added to the YAML.
"""

from __future__ import annotations

import re
from typing import Sequence

from tagmoe_lit.tags.annotators.base import Annotation, AnnotationRequest
from tagmoe_lit.tags.schema import TagSchema, TagSchemaError


class RuleAnnotator:
    """Keyword/regex rules per tag, declared in the schema YAML."""

    name = "rule"

    def __init__(self, schema: TagSchema | str):
        self.schema = TagSchema.load(schema) if isinstance(schema, str) else schema
        if not self.schema.rules:
            raise TagSchemaError(
                f"Tag schema {self.schema.name} ({self.schema.source}) declares no `rules:`; add keyword rules per tag "
                "(see tags/schemas/synthtag.yaml) or annotate with the qwen_vl annotator."
            )
        by_id = {tag: i for tags in self.schema.levels.values() for tag, i in tags.items()}
        # Rules in tag-id order: the fixed-point loop below is then the same on every run.
        self._rules = [
            (tag, rule, [re.compile(p, re.IGNORECASE) for p in rule.match], [re.compile(p, re.IGNORECASE) for p in rule.unless])
            for tag, rule in sorted(self.schema.rules.items(), key=lambda kv: by_id[kv[0]])
        ]
        self._ids = by_id

    def _why(self, text: str, has_source: bool, given: dict[str, str], rule, match, unless) -> str | None:
        """The reason this rule fires for the row, or None."""
        if (rule.source == "present" and not has_source) or (rule.source == "absent" and has_source):
            return None
        if match or rule.implied_by:
            hit = next((p.pattern for p in match if p.search(text)), None)
            reason = f"matched {hit!r}" if hit else next((f"implied by '{t}'" for t in rule.implied_by if t in given), None)
        else:
            reason = f"source {rule.source}"
        if reason is None or any(p.search(text) for p in unless):
            return None
        return reason

    def annotate_one(self, request: AnnotationRequest) -> Annotation:
        text, has_source = request.instruction, bool(request.sources)
        given: dict[str, str] = {}
        changed = True
        while changed:  # implied_by may chain; each pass only adds tags, so this ends
            changed = False
            for tag, rule, match, unless in self._rules:
                if tag not in given and (why := self._why(text, has_source, given, rule, match, unless)):
                    given[tag], changed = why, True
        tags = self.schema.decode(self._ids[t] for t in given)
        problem = None
        if not tags[self.schema.scope_level]:
            problem = f"no '{self.schema.scope_level}' rule matched the instruction {text!r}"
        return Annotation(tags=tags, raw={t: given[t] for t in sorted(given, key=self._ids.get)}, problem=problem)

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        return [self.annotate_one(r) for r in requests]
