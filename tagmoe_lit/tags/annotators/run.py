"""`python -m tagmoe_lit annotate`: tag every row of a JSONL manifest, resumably; or compare two.

    python -m tagmoe_lit annotate --manifest in.jsonl --out out.jsonl --schema synthtag --annotator rule
    python -m tagmoe_lit annotate --manifest in.jsonl --out out.jsonl --schema official18 \\
        --annotator qwen_vl --model-path /models/Qwen2.5-VL-7B-Instruct --device cuda --cache-dir .vlm_cache
    python -m tagmoe_lit annotate --compare truth.jsonl out.jsonl --schema synthtag

Each output row is the input row with `tags` ({level: [names]}, replacing any tags it had) and
`annotation` ({annotator, schema, schema_fingerprint, raw answer, problem}) added. The annotator
sees the row's source as training does: the first path of a list, none for an empty list. Image
paths stay as they are when the output sits in the input's folder; elsewhere they are rewritten
relative to the output's folder, so the output is a valid manifest wherever it is, and the row
gets a `split_key` (its target path relative to the input's folder, unless it had one) so it stays
in the same training split (`data/manifest.py`). Rows are written in input order, a chunk at a
time: each chunk is appended in one write and flushed to disk. Re-running the same command after
an interruption skips the rows already in the output (matched by instruction, source and target
resolved to absolute paths, so any spelling of a path matches; duplicates counted) and cuts off a
torn last line left by a kill mid-write; it refuses an output written by another annotator or
schema. Appending, rather than rewriting the whole file per chunk, keeps a million-row manifest
linear in time. Every file is read and written as UTF-8.

`--compare A B` scores B's tags against A's (rows matched the same way) with `agreement`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tagmoe_lit.io import relative_path
from tagmoe_lit.tags.annotators.agreement import AgreementReport, agreement
from tagmoe_lit.tags.annotators.answer_cache import content_key
from tagmoe_lit.tags.annotators.base import AnnotationRequest, Annotator
from tagmoe_lit.tags.schema import TagSchema, TagSchemaError


class ManifestRowError(ValueError):
    """A manifest line cannot be annotated; the message names the file, the line and the fix."""


_PATH_KEYS = ("source", "target", "mask")


def _absolute(value: str, folder: Path) -> str:
    """A path as written in a file in `folder` → normalized absolute path (lexically; links are not followed)."""
    return os.path.normpath(os.path.join(os.path.abspath(folder), value))


def _moved(value, old: Path, new: Path):
    """A row's path value (str, list of str, other) re-expressed from folder `old` to folder `new`."""
    if isinstance(value, list):
        return [_moved(v, old, new) for v in value]
    if isinstance(value, str) and not os.path.isabs(value):
        return os.path.relpath(_absolute(value, old), os.path.abspath(new))
    return value


def _resolved(value, folder: Path):
    """A row's path value (str, list of str, other) with every path made absolute."""
    if isinstance(value, list):
        return [_resolved(v, folder) for v in value]
    return _absolute(value, folder) if isinstance(value, str) else value


def row_key(row: dict, folder: Path) -> str:
    """Identity of a row across files: its instruction, and its source(s) and target as absolute paths.

    Relative paths are resolved from the file's folder and every path is normalized, so
    `images/a.png`, `./images/a.png` and `/data/set/images/a.png` are the same file; a single
    source and a one-path list are the same, and so are no source and an empty list.
    """
    source = row.get("source")
    sources = [source] if isinstance(source, str) else [] if source is None else source
    paths = [_resolved(sources, folder), _resolved(row.get("target"), folder)]
    return content_key(json.dumps([row.get("instruction"), *paths], sort_keys=True))


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank line; every row must be an object with an instruction."""
    path = Path(path)
    if not path.is_file():
        raise ManifestRowError(f"Manifest '{path}' does not exist; pass the path of a JSONL file with one sample per line.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ManifestRowError(f"Manifest {path} is not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8.") from None
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # only "\n" ends a line: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ManifestRowError(f"{path} line {n} is not valid JSON ({err.msg}); fix or remove the line.") from None
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise ManifestRowError(f"{path} line {n} has no non-empty 'instruction'; every row needs one to be annotated.")
        rows.append((n, row))
    return rows


def _sources(row: dict, folder: Path, where: str) -> tuple[Path, ...]:
    """The source image the annotator sees: the one training uses (the first of a list; none for absent, null or [])."""
    source = row.get("source")
    first = (source[0] if source else None) if isinstance(source, list) else source
    if first is None:
        return ()
    if not isinstance(first, str) or not first:
        raise ManifestRowError(f"{where}: 'source' must be a path or a list of paths, got {source!r}; fix the row.")
    return (folder / first,)


def _record(annotator: Annotator) -> dict[str, str]:
    """What an output row records about how it was annotated; resuming requires the same."""
    return {"annotator": annotator.name, "schema": annotator.schema.name, "schema_fingerprint": annotator.schema.fingerprint}


def _describe(record: dict) -> str:
    return f"{record['annotator']!r} with schema {record['schema']!r} (fingerprint {record['schema_fingerprint']})"


def _relocated(row: dict, old: Path, new: Path) -> dict:
    """`row` with its image paths rewritten from folder `old` to `new`, and its `split_key` kept (see module doc)."""
    moved = {k: _moved(v, old, new) if k in _PATH_KEYS else v for k, v in row.items()}
    if "split_key" not in row and isinstance(row.get("target"), str):
        moved["split_key"] = relative_path(row["target"], old)  # what the split hashed in the input manifest
    return moved


def _done_rows(out: Path, annotator: Annotator) -> Counter:
    """Keys of the complete rows already in `out`, all annotated as `annotator` would; a torn last line is cut off."""
    if not out.is_file():
        return Counter()
    data = out.read_bytes()
    keep = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
    try:
        text = data[:keep].decode("utf-8")
    except UnicodeDecodeError as err:
        raise ManifestRowError(
            f"{out} is not UTF-8 text (bad byte at offset {err.start}), so the run cannot resume from it; delete the file."
        ) from None
    expected = _record(annotator)
    done = Counter()
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ManifestRowError(
                f"{out} line {n} is not valid JSON, so the run cannot resume from it; delete the file or fix the line."
            ) from None
        annotation = row.get("annotation") if isinstance(row, dict) else None
        found = {k: annotation.get(k) for k in expected} if isinstance(annotation, dict) else {k: None for k in expected}
        if found != expected:
            raise ManifestRowError(
                f"{out} line {n} was annotated by {_describe(found)}, but this run annotates with {_describe(expected)}; "
                "write to a new --out file, or resume with the annotator and schema the file was started with."
            )
        done[row_key(row, out.parent)] += 1
    if keep < len(data):
        with open(out, "r+b") as f:
            f.truncate(keep)
    return done


@dataclass
class AnnotateSummary:
    rows: int
    resumed: int  # rows found already annotated in the output
    annotated: int
    flagged: list[tuple[int, str]]  # (line, problem) of this run's flagged rows
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.annotated / self.seconds if self.seconds > 0 else float("inf")


def annotate_manifest(
    manifest: str | Path, out: str | Path, annotator: Annotator, chunk_size: int = 256, progress: bool = True
) -> AnnotateSummary:
    """Annotate `manifest` into `out` (resumable, see module doc); warns once about flagged rows."""
    from tqdm.auto import tqdm

    manifest, out = Path(manifest), Path(out)
    if manifest.resolve() == out.resolve():
        raise ManifestRowError(f"--out {out} is the input manifest; write the annotated rows to another file.")
    rows = read_rows(manifest)
    done = _done_rows(out, annotator)
    todo = []
    for n, row in rows:
        key = row_key(row, manifest.parent)
        if done[key] > 0:
            done[key] -= 1
        else:
            todo.append((n, row))
    out.parent.mkdir(parents=True, exist_ok=True)
    relocate = out.parent.resolve() != manifest.parent.resolve()
    flagged: list[tuple[int, str]] = []
    start = time.perf_counter()
    record = _record(annotator)
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), unit="row", disable=not progress, desc="annotate")
    with open(out, "a", encoding="utf-8") as f, bar:
        for first in range(0, len(todo), chunk_size):
            chunk = todo[first : first + chunk_size]
            requests = [
                AnnotationRequest(row["instruction"], _sources(row, manifest.parent, f"{manifest} line {n}"), f"{manifest} line {n}")
                for n, row in chunk
            ]
            annotations = list(annotator.annotate(requests))
            if len(annotations) != len(requests):
                raise ManifestRowError(
                    f"Annotator {annotator.name!r} returned {len(annotations)} annotations for {len(requests)} rows "
                    f"({manifest} lines {chunk[0][0]}-{chunk[-1][0]}); an annotator must return one per request, in order."
                )
            lines = []
            for (n, row), ann in zip(chunk, annotations):
                if relocate:
                    row = _relocated(row, manifest.parent, out.parent)
                annotation = {**record, "raw": ann.raw, "problem": ann.problem}
                lines.append(json.dumps({**row, "tags": ann.tags, "annotation": annotation}) + "\n")
                if ann.problem:
                    flagged.append((n, ann.problem))
            f.write("".join(lines))  # one write per chunk, then to disk: a kill leaves whole rows or a torn last line
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(chunk))
    summary = AnnotateSummary(len(rows), len(rows) - len(todo), len(todo), flagged, time.perf_counter() - start)
    if flagged:
        n, problem = flagged[0]
        warnings.warn(
            f"{len(flagged)} of {len(todo)} rows annotated now were flagged (first: {manifest} line {n}: {problem}); "
            "training refuses flagged rows unless data.on_bad_sample is 'skip', so fix the rules or the rows.",
            stacklevel=2,
        )
    return summary


def compare_manifests(reference: str | Path, candidate: str | Path, schema: TagSchema) -> tuple[AgreementReport, int, int]:
    """Agreement of `candidate`'s tags with `reference`'s on the rows both have; also (unmatched ref, unmatched cand)."""
    ref_rows, cand_rows = read_rows(reference), read_rows(candidate)
    pool: dict[str, list[tuple[int, dict]]] = {}
    for n, row in cand_rows:
        pool.setdefault(row_key(row, Path(candidate).parent), []).append((n, row))
    ref_tags, cand_tags, missing = [], [], 0
    for n, row in ref_rows:
        match = pool.get(row_key(row, Path(reference).parent))
        if not match:
            missing += 1
            continue
        m, other = match.pop(0)
        for path, r, line in ((reference, row, n), (candidate, other, m)):
            if "tags" not in r:
                raise ManifestRowError(f"{path} line {line} has no 'tags'; both manifests must be annotated to compare them.")
            try:
                schema.encode(r["tags"])
            except (TagSchemaError, TypeError) as err:
                raise ManifestRowError(f"{path} line {line}: {str(err).rstrip('.')}; compare manifests tagged with the same schema.") from None
        ref_tags.append(row["tags"])
        cand_tags.append(other["tags"])
    extra = sum(len(v) for v in pool.values())
    return agreement(ref_tags, cand_tags, schema), missing, extra


def build_annotator(args: argparse.Namespace, schema: TagSchema) -> Annotator:
    if args.annotator == "rule":
        from tagmoe_lit.tags.annotators.rules import RuleAnnotator

        return RuleAnnotator(schema)
    from tagmoe_lit.tags.annotators.qwen_vl import QwenVLAnnotator

    if not args.model_path:
        raise SystemExit("annotate --annotator qwen_vl needs --model-path, a local Qwen2.5-VL folder.")
    return QwenVLAnnotator(
        schema, args.model_path, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, retries=args.retries,
        device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tagmoe_lit annotate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", help="input JSONL manifest (rows with instruction, target, optional source)")
    p.add_argument("--out", help="output JSONL (created, or resumed when it exists)")
    p.add_argument("--compare", nargs=2, metavar=("REFERENCE", "CANDIDATE"), help="print the agreement of CANDIDATE's tags with REFERENCE's")
    p.add_argument("--schema", default="synthtag", help="tag schema name or YAML path (default: synthtag)")
    p.add_argument("--annotator", choices=("rule", "qwen_vl"), default="rule",
                   help="rule: the schema's keyword rules; qwen_vl: a local Qwen2.5-VL")
    p.add_argument("--chunk-size", type=int, default=256, help="rows per chunk written to --out")
    p.add_argument("--model-path", help="qwen_vl: local Qwen2.5-VL folder")
    p.add_argument("--batch-size", type=int, default=4, help="qwen_vl: requests per generate call")
    p.add_argument("--max-new-tokens", type=int, default=128, help="qwen_vl: answer length limit")
    p.add_argument("--retries", type=int, default=1, help="qwen_vl: extra attempts for an invalid answer")
    p.add_argument("--device", default="cpu", help="qwen_vl: torch device")
    p.add_argument("--dtype", default="auto", help="qwen_vl: auto, float32, bfloat16 or float16")
    p.add_argument("--cache-dir", help="qwen_vl: answer cache folder, reused across runs")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> Any:
    args = parser().parse_args(argv)
    schema = TagSchema.load(args.schema)
    if args.compare:
        report, missing, extra = compare_manifests(*args.compare, schema)
        print(report.format())
        if missing or extra:
            print(f"\nUnmatched rows: {missing} only in {args.compare[0]}, {extra} only in {args.compare[1]}.")
        return report
    if not args.manifest or not args.out:
        raise SystemExit("annotate needs --manifest IN.jsonl and --out OUT.jsonl (or --compare REFERENCE CANDIDATE).")
    summary = annotate_manifest(args.manifest, args.out, build_annotator(args, schema), args.chunk_size, progress=not args.no_progress)
    print(
        f"Annotated {summary.annotated} rows in {summary.seconds:.2f} s ({summary.rows_per_second:.0f} rows/s); "
        f"{summary.resumed} were already in {args.out}; {len(summary.flagged)} flagged. Output: {args.out}",
        file=sys.stderr,
    )
    return summary
