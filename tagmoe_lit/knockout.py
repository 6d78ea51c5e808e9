"""Expert knockout: disable one expert in every MoE layer at a time and see which tasks suffer.

    python -m tagmoe_lit knockout --config experiments/base.yaml --ckpt_path runs/base/…/last.ckpt

Runs the kit's `test` once with all experts and once per knocked-out expert (its tokens go to their
next-best expert, `MoELayer.knockout`), then writes `knockout.json` and `knockout.md` beside the
checkpoint: per task, each metric with all experts and its change when expert e is gone. Every
other argument is a normal config override (e.g. `--data.test_samples 144`,
`--model.sample_in_test false` for flow losses only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tagmoe_lit.cli import TagMoECLI
from tagmoe_lit.io import atomic_write_text
from tagmoe_lit.metrics.knockout import to_markdown
from tagmoe_lit.metrics.report import json_safe


def knockout(cli: TagMoECLI, ckpt_path: str) -> dict:
    """{'all_experts': summary, 'without_e{j}': summary, …} from one `test` per configuration."""
    model, trainer = cli.model, cli.trainer
    model.configure_model()
    if not model.moe_layers:
        raise ValueError("Expert knockout needs an MoE model; this config builds a dense backbone.")
    results = {}
    report_name, model.test_report_name = model.test_report_name, None  # per-run reports would overwrite each other
    try:
        for expert in [None, *range(model.num_experts)]:
            for layer in model.moe_layers:
                layer.knockout(() if expert is None else (expert,))
            trainer.test(model, datamodule=cli.datamodule, ckpt_path=ckpt_path, verbose=False)
            results["all_experts" if expert is None else f"without_e{expert}"] = model.test_summary
    finally:
        for layer in model.moe_layers:
            layer.knockout(())
        model.test_report_name = report_name
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m tagmoe_lit knockout",
        description="Test a checkpoint with each expert knocked out of every MoE layer in turn; "
        "other arguments are config options as for `test` (--config …, --data.test_samples …).",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `fit`")
    known, rest = parser.parse_known_args(argv)
    cli = TagMoECLI(args=[*rest, "--trainer.logger", "false"], run=False)
    results = knockout(cli, known.ckpt_path)
    if cli.trainer.is_global_zero:
        metrics = [m for m in ("success", "flow_fixed") if m in results["all_experts"]["all"]]
        text = "\n".join(f"### {m}\n\n{to_markdown(results, m)}" for m in metrics)
        out = Path(known.ckpt_path).resolve().parent
        atomic_write_text(out / "knockout.json", json.dumps(json_safe(results), indent=2, allow_nan=False))
        atomic_write_text(out / "knockout.md", text)
        print(f"\n{text}\nWrote {out / 'knockout.json'} and {out / 'knockout.md'}")
    return results
