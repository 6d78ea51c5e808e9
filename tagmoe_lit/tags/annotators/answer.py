"""The VLM annotator's contract with the model: a prompt built from the schema, and a strict parser.

The prompt lists every level with its tag names and asks for one JSON object
`{"<level>": ["<tag>", ...], ...}`. `parse_answer` accepts exactly that (a ```json fence or text
around the object is tolerated; a bare string stands for a one-tag list) and rejects everything
else with the reason, which the annotator feeds back to the model on a retry: unknown levels, tag
names outside the level's vocabulary (a tag of another level is named as such), other value types,
and an answer without a tag on the first (Scope) level. Names are compared case- and
whitespace-insensitively; the result uses the schema's spelling, tags in id order.
"""

from __future__ import annotations

import json
import re

from tagmoe_lit.tags.schema import TagSchema


class AnswerError(ValueError):
    """A model's answer is not a valid tag set for the schema; the message says what is wrong."""


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name).strip().lower()


def build_prompt(schema: TagSchema) -> str:
    """System prompt: the task, the levels with their tags, and the exact answer format."""
    scope = schema.scope_level
    lines = [
        "You annotate image editing and image generation requests with task tags.",
        "You see the request's input image(s), if any, and its instruction. Choose tags only from these lists:",
    ]
    for level, tags in schema.levels.items():
        rule = "at least one" if level == scope else "zero or more"
        lines.append(f"- {level} ({rule}): " + ", ".join(sorted(tags, key=tags.get)))
    example = ", ".join(f'"{level}": [...]' for level in schema.levels)
    lines.append(f"Answer with one JSON object and nothing else: {{{example}}}.")
    return "\n".join(lines)


def _json_object(text: str) -> dict:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise AnswerError("the answer contains no JSON object")
    try:
        value = json.loads(text[start : end + 1])
    except json.JSONDecodeError as err:
        raise AnswerError(f"the answer's JSON object does not parse ({err.msg})") from None
    if not isinstance(value, dict):
        raise AnswerError("the answer is not a JSON object")
    return value


def parse_answer(text: str, schema: TagSchema) -> dict[str, list[str]]:
    """Answer text → {level: [tag names]} for every level; raises `AnswerError` naming every problem."""
    answer = _json_object(text)
    levels = {_norm(level): level for level in schema.levels}
    where = {_norm(tag): (level, tag) for level, tags in schema.levels.items() for tag in tags}
    chosen: set[str] = set()
    problems = []
    for key, value in answer.items():
        level = levels.get(_norm(str(key)))
        if level is None:
            problems.append(f"unknown level {key!r} (levels: {list(schema.levels)})")
            continue
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            problems.append(f"level '{level}' must be a list of tag names, got {value!r}")
            continue
        for name in names:
            found = where.get(_norm(name))
            if found is None:
                problems.append(f"{name!r} is not a tag (valid '{level}' tags: {list(schema.levels[level])})")
            elif found[0] != level:
                problems.append(f"{name!r} is a '{found[0]}' tag, not a '{level}' tag")
            else:
                chosen.add(found[1])
    if problems:
        raise AnswerError("; ".join(problems))
    tags = schema.decode(schema.encode(chosen))
    if not tags[schema.scope_level]:
        raise AnswerError(f"the answer names no '{schema.scope_level}' tag (choose at least one of {list(schema.levels[schema.scope_level])})")
    return tags
