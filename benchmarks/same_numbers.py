"""Did a refactor move a number? Compare two runs' TensorBoard scalars and test reports bit for bit.

A refactor proves itself by numbers that do not move: run the same deterministic fit (and `test` on
its checkpoint) before and after the change, each into its own folder, then

    python benchmarks/same_numbers.py BEFORE_DIR AFTER_DIR

Every scalar tag of every event file under each folder (train/, val/, test/, moe/, …) is compared as
(step, value) lists, and every `test_report.json` as parsed JSON. Exits 1 and names what differs.
The procedure used for issue 14 (60 steps of base.yaml, validation every 30) is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    """{"<event-file folder relative to root>:<tag>": [(step, value), …]} of every event file under root."""
    out = {}
    for events in sorted(root.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        where = events.parent.relative_to(root).as_posix()
        out.update({f"{where}:{tag}": [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]})
    return out


def reports(root: Path) -> dict[str, object]:
    return {p.relative_to(root).as_posix(): json.loads(p.read_text()) for p in sorted(root.rglob("test_report.json"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    a, b = scalars(args.before), scalars(args.after)
    ra, rb = reports(args.before), reports(args.after)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    report_differ = sorted(k for k in ra.keys() | rb.keys() if ra.get(k) != rb.get(k))
    print(f"{len(a)} scalar tags, {sum(map(len, a.values()))} points; {len(ra)} test reports")
    if not a or (not differ and not report_differ):
        print("identical" if a else "no event files found", flush=True)
        return 0 if a else 1
    print("differ:", ", ".join(differ + report_differ))
    return 1


if __name__ == "__main__":
    sys.exit(main())
