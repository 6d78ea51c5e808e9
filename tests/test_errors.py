"""Bad input through the real CLI: one line naming the culprit and the fix, a non-zero exit, nothing written.

Each class of mistake a user makes with files and options (issue 15) runs in a fresh process. The
interpreter's start (~8 s of imports) dominates, so the classes share one process that calls the
kit's entry point (`tagmoe_lit.__main__.main`, what `python -m tagmoe_lit` runs) once per case with
stderr captured, and two representative cases run as `python -m tagmoe_lit` itself. Every case
fails before its first step; its `trainer.default_root_dir` must be left absent or empty.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from safetensors.torch import save_file

from tagmoe_lit.tags import TagSchema
from helpers import BASE, ROOT

FAST = ["--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.batch_size", "4", "--data.val_samples", "4"]
DRIVER = """
import contextlib, io, json, sys
from tagmoe_lit.__main__ import main
cases, results = json.loads(open(sys.argv[1]).read()), {}
for name, argv in cases.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    results[name] = [code, err.getvalue()]
open(sys.argv[2], "w").write(json.dumps(results))
"""
CASES = ["missing checkpoint", "empty checkpoint", "truncated checkpoint", "random bytes as checkpoint", "YAML as checkpoint",
         "safetensors as checkpoint", "checkpoint of another expert count", "missing config", "broken YAML as the main config",
         "broken YAML as a second config", "value of the wrong type", "unknown class_path", "schema with duplicate ids",
         "schema with an empty level", "manifest that does not exist", "output directory under a file"]


def _inputs(d: Path) -> dict[str, Path]:
    """One bad file per class of mistake, written under `d`."""
    synthtag = TagSchema.load("synthtag")
    record = {"schema": synthtag.name, "schema_fingerprint": synthtag.fingerprint, "num_tags": synthtag.num_tags,
              "num_experts": 2, "moe_layers": 2}
    torch.save({"state_dict": {}, "tagmoe": record, "pytorch-lightning_version": lightning.__version__}, d / "two_experts.ckpt")
    whole = (d / "two_experts.ckpt").read_bytes()
    files = {
        "empty.ckpt": b"", "truncated.ckpt": whole[: len(whole) // 2], "random.ckpt": os.urandom(4096),
        "config.ckpt": b"trainer:\n  max_steps: 2\n",
        "broken.yaml": b"trainer:\n  max_steps: [2\n  devices: 1\n",
        "dup_ids.yaml": b"name: dup\nlevels:\n  scope: {a: 0, b: 0}\n  type: {c: 1}\n",
        "empty_level.yaml": b"name: hole\nlevels:\n  scope: {a: 0}\n  type: {}\n",
        "a_file": b"not a directory\n",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    save_file({"w": torch.zeros(2)}, d / "weights.safetensors")
    return {name: d / name for name in [*files, "two_experts.ckpt", "weights.safetensors"]}


def _cases(d: Path, f: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """{case: (arguments after the command, text the last 5 lines of stderr must hold)}."""
    manifest = ["--config", str(ROOT / "experiments" / "manifest_example.yaml")]
    return {
        "missing checkpoint": (["fit", "--ckpt_path", str(d / "nope.ckpt")], "nope.ckpt: checkpoint not found"),
        "empty checkpoint": (["fit", "--ckpt_path", str(f["empty.ckpt"])], "empty.ckpt: checkpoint is empty"),
        "truncated checkpoint": (["validate", "--ckpt_path", str(f["truncated.ckpt"])], "truncated.ckpt: checkpoint is truncated"),
        "random bytes as checkpoint": (["test", "--ckpt_path", str(f["random.ckpt"])], "random.ckpt: is not a PyTorch checkpoint"),
        "YAML as checkpoint": (["fit", "--ckpt_path", str(f["config.ckpt"])], "config.ckpt: is a text file"),
        "safetensors as checkpoint": (["predict", "--ckpt_path", str(f["weights.safetensors"])], "weights.safetensors: is a safetensors file"),
        "checkpoint of another expert count": (["validate", "--ckpt_path", str(f["two_experts.ckpt"])],
                                               "two_experts.ckpt: Checkpoint does not match this model (num_experts: checkpoint 2 vs config 4)"),
        "missing config": (["fit", "--config", str(d / "nope.yaml")], "nope.yaml: config file not found"),
        "broken YAML as the main config": (["fit", "--config", str(f["broken.yaml"])], "broken.yaml:3:10: is not valid YAML"),
        "broken YAML as a second config": (["fit", "--config", str(BASE), "--config", str(f["broken.yaml"])], "broken.yaml:3:10: is not valid YAML"),
        "value of the wrong type": (["fit", "--trainer.max_steps", "two"], "Bad option trainer.max_steps: expected int, got two"),
        "unknown class_path": (["fit", "--model.backbone.init_args.moe.init_args.router", "tagmoe_lit.moe.NoRouter"],
                               "'tagmoe_lit.moe.NoRouter' does not exist"),
        "schema with duplicate ids": (["fit", "--data.schema", str(f["dup_ids.yaml"])], "dup_ids.yaml: id 0 is used by both 'a' and 'b'"),
        "schema with an empty level": (["fit", "--data.schema", str(f["empty_level.yaml"])], "level 'type' must map tag names to integer ids and not be empty"),
        "manifest that does not exist": (["fit", *manifest, "--data.init_args.manifests", f"[{d / 'nope.jsonl'}]"], "nope.jsonl' does not exist"),
        "output directory under a file": (["fit", "--trainer.default_root_dir", str(f["a_file"] / "run")], "a_file: is a file"),
    }


def _argv(case: str, args: list[str], runs: Path) -> list[str]:
    """`args` on the base config (unless the case gives its own first), fast, writing (if at all) under
    runs/<case> unless the case names its own output directory."""
    command, rest = args[0], args[1:]
    own_config = rest[:1] == ["--config"] and "manifest" not in rest[1]
    root = [] if "--trainer.default_root_dir" in rest else ["--trainer.default_root_dir", str(runs / case.replace(" ", "_"))]
    return [command, *([] if own_config else ["--config", str(BASE)]), *FAST, *rest, *root]


@pytest.fixture(scope="module")
def failures(tmp_path_factory) -> dict[str, tuple[int, str, str, Path]]:
    """{case: (exit status, stderr, expected text, its default_root_dir)}: every case in one process."""
    d = tmp_path_factory.mktemp("bad_inputs")
    runs = d / "runs"
    cases = _cases(d, _inputs(d))
    argvs = {case: _argv(case, args, runs) for case, (args, _) in cases.items()}
    (d / "cases.json").write_text(json.dumps(argvs))
    done = subprocess.run([sys.executable, "-c", DRIVER, str(d / "cases.json"), str(d / "results.json")], cwd=d,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((d / "results.json").read_text())
    assert list(cases) == CASES
    return {case: (*results[case], cases[case][1], runs / case.replace(" ", "_")) for case in cases}


def _nothing_written(root: Path) -> bool:
    return not root.exists() or not any(root.iterdir())


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_one_line_naming_the_culprit(failures, case):
    code, stderr, expected, root = failures[case]
    last = stderr.strip().splitlines()[-5:]
    assert code != 0, stderr[-2000:]
    assert any(expected in line for line in last), "\n".join(last)
    assert last[-1].startswith("error: ") and last[-1].endswith("."), last[-1]
    assert "weights_only=False" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert _nothing_written(root), sorted(map(str, root.rglob("*")))


@pytest.mark.parametrize("case", ["truncated checkpoint", "broken YAML in a second config"])
def test_python_dash_m_reports_the_file_and_exits_1(tmp_path, case):
    """The same path through `python -m tagmoe_lit` itself: exit status 1, the file named on the last line."""
    if case == "truncated checkpoint":
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "tagmoe": {}}, tmp_path / "last.ckpt")
        (tmp_path / "last.ckpt").write_bytes((tmp_path / "last.ckpt").read_bytes()[:3000])
        extra, culprit = ["--ckpt_path", str(tmp_path / "last.ckpt")], f"{tmp_path / 'last.ckpt'}: checkpoint is truncated"
    else:
        (tmp_path / "overlay.yaml").write_text("model:\n  lambda_lb: 0.01\n    lambda_align: 1.0\n")
        extra, culprit = ["--config", str(tmp_path / "overlay.yaml")], f"{tmp_path / 'overlay.yaml'}:3:17: is not valid YAML"
    argv = ["fit", "--config", str(BASE), *FAST, "--trainer.default_root_dir", str(tmp_path / "run"), *extra]
    done = subprocess.run([sys.executable, "-m", "tagmoe_lit", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {culprit}"), done.stderr[-2000:]
    assert "weights_only=False" not in done.stderr and not (tmp_path / "run").exists()
