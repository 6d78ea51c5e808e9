"""A study run's folder and identity: where it lives (`run_dir`), what it runs with, its
fingerprint, and whether it is done (`load_done`).

Run `variant` on seed `s` lives in `<out>/<variant>/seed<s>/` and is done when its `done.json` holds
the fingerprint of its current resolved config (or, for runs finished before issue 14 reshaped the
configs, the fingerprint of the same config in its earlier form: `legacy_config`; a config that
issue 16's new defaults make compute something else has no earlier form). `runner.py`
trains runs into these folders and `report.py` reads the finished ones: both import this file, and
the report never imports the runner (which imports the report). `_seeded` (a run's arguments) is a
study-internal helper that `runner.py` shares.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from tagmoe_lit.io import atomic_write_text
from tagmoe_lit.study.preset import Curves, Run


def run_dir(out: Path, run: Run) -> Path:
    return out / run.variant / f"seed{run.seed}"


@dataclass(frozen=True)
class RunKey:
    """A run's fingerprint, and the one the kit gave the same run before issue 14 (see `legacy_config`)."""

    current: str
    legacy: str | None = None  # None: no run of that kit could have had this config


def load_done(directory: Path, key: RunKey) -> dict | None:
    """The run's `done.json` if it was finished with these configs, else None. A marker written under
    the legacy fingerprint is rewritten with the current one (the results do not change)."""
    marker = directory / "done.json"
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    if done.get("fingerprint") == key.current:
        return done
    if key.legacy is None or done.get("fingerprint") != key.legacy:
        return None
    done.update(fingerprint=key.current, migrated_from=key.legacy)
    atomic_write_text(marker, json.dumps(done, indent=2))
    return done


def fingerprint(run: Run, extra: list[str], curves: Curves) -> RunKey:
    """Hash of what decides the run's results: its resolved config (so a comment, or an option a
    later config overrides, changes nothing) and the extras it runs (curve points, knockout)."""
    from tagmoe_lit.cli import resolved_config

    where = ["--trainer.default_root_dir", ".", "--trainer.logger.init_args.save_dir", "."]  # set per run at fit
    config = resolved_config([*_seeded(run, extra), *where], leave_out=LATER_NOOPS)
    extras = json.dumps([run.curve and (curves.every_n_steps, curves.test_samples), run.knockout])
    old = legacy_config(config)
    return RunKey(_digest(config + extras), None if old is None else _digest(old + extras))


# Options added after runs were recorded, at the value that computes exactly what the kit did before
# them: left out of the fingerprint at that value, so a new option never retrains a finished study.
LATER_NOOPS = {"model.lora": None, "model.sampler.init_args.renormalize": False}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _seeded(run: Run, extra: list[str]) -> list[str]:
    configs = [a for path in run.configs for a in ("--config", path)]
    return [*configs, "--seed_everything", str(run.seed), "--model.seed", str(run.seed), *extra]


# -- fingerprints of runs finished before the refactor of the module (issue 14) ----------------------
# That refactor changed resolved configs without changing what a run computes: the optimizer became a
# class_path block (it was an import string beside model.lr / weight_decay / betas), the FSDP2 options
# moved from model.* to the strategy, and the encoders' disk caches moved from tagmoe_lit.data to
# tagmoe_lit.backbone. `legacy_config` writes today's resolved config in the earlier form, so a run
# finished then is recognised by the fingerprint it was given; `load_done` then rewrites its marker.
LEGACY_CLASS_PATHS = {"tagmoe_lit.backbone.CachedTextEncoder": "tagmoe_lit.data.CachedTextEncoder",
                      "tagmoe_lit.backbone.CachedCodec": "tagmoe_lit.data.CachedCodec"}
LEGACY_ADAMW = {"eps": 1e-08, "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                "differentiable": False, "fused": None}  # what the old module left at torch's defaults


# Issue 16 added options that change what a run computes; their values in the earlier kit:
ISSUE16_EARLIER = {"routing_tokens": "target", "expert_init": "tied", "align_dropped_text": True}


def _strip_issue16(model: dict) -> bool:
    """Remove the options issue 16 added from a resolved model config; False when one of them departs
    from the earlier kit's behaviour where it matters (routing and init with MoE layers, alignment
    with a tag embedder too; none of them in a dense model)."""
    backbone = model["backbone"]["init_args"]
    moe = backbone.get("moe")
    found = {"routing_tokens": backbone.pop("routing_tokens", "target"),
             "align_dropped_text": model.pop("align_dropped_text", True)}
    if not moe:
        return True
    found["expert_init"] = moe["init_args"].pop("expert_init", "tied")
    if not model.get("tag_embedder"):
        found["align_dropped_text"] = True  # no alignment: the option cannot matter
    return found == ISSUE16_EARLIER


def legacy_config(config: str) -> str | None:
    """`config` (a resolved config dump) as the kit wrote it before issue 14, or None when no run of
    that kit could have had it (another optimizer or non-default AdamW options, FSDP2 options, or
    issue 16's options away from the earlier behaviour: independent experts, `image` routing tokens,
    unaligned text-dropped samples; its new default `expert_bias: false` differs in the dump itself)."""
    header, _, body = config.partition("\n")
    tree = yaml.safe_load(body)
    model = tree["model"]
    if not _strip_issue16(model):
        return None
    optimizer = model.get("optimizer") or {}
    options = dict(optimizer.get("init_args") or {})
    old = {k: options.pop(k, None) for k in ("lr", "weight_decay", "betas")}
    if optimizer.get("class_path") != "torch.optim.AdamW" or options != LEGACY_ADAMW:
        return None
    if tree.get("trainer", {}).get("strategy") not in (None, "auto"):
        return None
    rebuilt = {}
    for key, value in model.items():
        if key == "optimizer":
            rebuilt.update(optimizer="torch.optim.AdamW", **old)
        elif isinstance(value, dict) and value.get("class_path") in LEGACY_CLASS_PATHS:
            rebuilt[key] = {**value, "class_path": LEGACY_CLASS_PATHS[value["class_path"]]}
        else:
            rebuilt[key] = value
    rebuilt.update(activation_checkpointing=False, hybrid_shard=False)
    tree["model"] = rebuilt
    return header + "\n" + yaml.safe_dump(tree, default_flow_style=False, allow_unicode=True, sort_keys=False)
