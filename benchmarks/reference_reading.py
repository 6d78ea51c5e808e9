"""Does a checkpoint read its reference image? The one-step clean-image estimate by noise level.

For edits most of the target is a copy (local edits) or a per-pixel function (invert, relight) of
the source, so a model that reads the reference frame predicts them even from pure noise. From
the flow prediction v̂ at noise level σ the clean image is x̂0 = x_σ − σ·v̂; this prints, per σ,
the share of pixels whose every channel is within 0.1 of the target, over the first
`--samples` test samples (all tasks, fixed per-sample noise), overall and per task. At σ = 0.95
almost nothing of the target is left in x_σ: there the figure is reference reading alone.
It is how docs/benchmarks.md picks `make fit`'s defaults.

Usage: python benchmarks/reference_reading.py --config experiments/base.yaml --ckpt_path …/last.ckpt
       [--samples 64] [--sigmas 0.5 0.75 0.95] [config overrides …]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from tagmoe_lit.cli import TagMoECLI
from tagmoe_lit.generation import clean_estimate


@torch.no_grad()
def reference_reading(cli: TagMoECLI, ckpt_path: str, samples: int, sigmas: list[float]) -> dict[float, dict[str, float]]:
    """{σ: {"all": share, task: share, …}} of pixels within 0.1 of the target in x̂0."""
    model, data = cli.model, cli.datamodule
    model.configure_model()
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model.on_load_checkpoint(state)  # the same identity checks as a resume
    model.load_state_dict(state["state_dict"])
    model.eval()
    data.setup("test")
    hits: dict[float, dict[str, list[float]]] = {s: defaultdict(list) for s in sigmas}
    seen = 0
    for batch in data.test_dataloader():
        for s in sigmas:
            image = clean_estimate(model, batch, s)
            within_B = ((image - batch["target"]).abs().amax(1) <= 0.1).float().mean((1, 2))
            for task, share in zip(batch["task"].tolist(), within_B.tolist()):
                hits[s][data.task_names[task]].append(share)
                hits[s]["all"].append(share)
        seen += len(batch["instruction"])
        if seen >= samples:
            break
    return {s: {k: sum(v) / len(v) for k, v in per.items()} for s, per in hits.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 0.75, 0.95])
    known, rest = parser.parse_known_args(argv)
    cli = TagMoECLI(args=[*rest, "--trainer.logger", "false"], run=False)
    table = reference_reading(cli, known.ckpt_path, known.samples, known.sigmas)
    names = list(next(iter(table.values())))
    print("share of x̂0 pixels within 0.1 of the target")
    print(f"{'σ':>5} " + " ".join(f"{n[:10]:>10}" for n in names))
    for s, row in table.items():
        print(f"{s:>5.2f} " + " ".join(f"{row[n]:>10.3f}" for n in names))


if __name__ == "__main__":
    main()
