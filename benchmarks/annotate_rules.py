"""Rule annotator on SynthTAG: throughput of `annotate` and agreement with the ground-truth tags.

Writes N SynthTAG samples as a manifest of PNGs (with their true tags) and an untagged copy, runs
`annotate --annotator rule` on the copy (timed, repeated; the median is reported) and prints the
agreement report of the rule tags against the truth. Usage:
python benchmarks/annotate_rules.py [--rows 2000] [--schema synthtag] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from tagmoe_lit.data.export import export_synthtag
from tagmoe_lit.tags import TagSchema
from tagmoe_lit.tags.annotators import RuleAnnotator
from tagmoe_lit.tags.annotators.run import annotate_manifest, compare_manifests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--schema", default="synthtag")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="keep the manifests here (default: a temporary folder)")
    args = p.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="annotate_rules_"))
    truth = export_synthtag(root, args.rows, seed=0, manifest_name="truth.jsonl")
    bare = root / "bare.jsonl"
    bare.write_text("".join(json.dumps({k: v for k, v in json.loads(l).items() if k != "tags"}) + "\n" for l in truth.read_text().splitlines()))
    schema = TagSchema.load(args.schema)
    annotator = RuleAnnotator(schema)
    rates = []
    for r in range(args.repeats):
        out = root / f"rules_{r}.jsonl"
        out.unlink(missing_ok=True)
        summary = annotate_manifest(bare, out, annotator, progress=False)
        rates.append(summary.rows_per_second)
    print(f"annotate --annotator rule on {args.rows} SynthTAG rows (schema {schema.name}): "
          f"{statistics.median(rates):,.0f} rows/s median of {args.repeats} (all: {', '.join(f'{x:,.0f}' for x in rates)}); "
          f"{len(summary.flagged)} rows flagged")
    report, missing, extra = compare_manifests(truth, out, schema)
    print(report.format())
    if missing or extra:
        print(f"unmatched rows: {missing} / {extra}")


if __name__ == "__main__":
    main()
