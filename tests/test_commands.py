"""`python -m tagmoe_lit <command>`: one command table, every command answers `--help`, the README agrees.

Commands run in-process through `tagmoe_lit.__main__.run` (each import is paid once per session);
only the checks about the real process (exit status, nothing heavy imported for the table) start
a subprocess, and those never import torch.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tagmoe_lit.__main__ import COMMANDS, run

README = Path(__file__).resolve().parents[1] / "README.md"


def _exit_code(argv: list[str]) -> object:
    with pytest.raises(SystemExit) as exit:
        run(argv)
    return exit.value.code


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]], ids=["no-args", "--help", "-h"])
def test_without_a_command_the_table_is_printed(argv, capsys):
    assert _exit_code(argv) == 0
    out = capsys.readouterr().out
    for name, (summary, _) in COMMANDS.items():
        assert re.search(rf"^\s+{re.escape(name)}\s+{re.escape(summary)}$", out, re.MULTILINE), name


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_answers_help(command, capsys):
    assert _exit_code([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.strip(), f"`{command} --help` printed nothing"


def test_unknown_command_prints_the_table_and_one_sentence_and_exits_2(capsys):
    assert _exit_code(["fitt", "--config", "experiments/base.yaml"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in COMMANDS)
    message = err.strip().splitlines()[-1]
    assert "'fitt'" in message and message.endswith(".") and message.count(". ") == 0


def test_readme_lists_exactly_the_commands():
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Commands\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Commands' section"
    listed = re.findall(r"^\| `([^`]+)` \|", section.group(1), re.MULTILINE)
    assert listed == list(COMMANDS), f"README only: {set(listed) - set(COMMANDS)}; table only: {set(COMMANDS) - set(listed)}"


def test_the_process_exits_0_for_the_table_without_importing_torch_and_2_for_an_unknown_command():
    table = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom tagmoe_lit.__main__ import run\ntry:\n    run([])\nexcept SystemExit as e:\n"
         "    assert e.code == 0, e.code\nassert 'torch' not in sys.modules, 'the table imported torch'"],
        capture_output=True, text=True, timeout=60,
    )
    assert table.returncode == 0, table.stderr
    assert "consolidate" in table.stdout
    unknown = subprocess.run([sys.executable, "-m", "tagmoe_lit", "nonsense"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "Unknown command 'nonsense'" in unknown.stderr


def test_consolidate_refuses_a_folder_that_is_not_a_checkpoint_directory(tmp_path, capsys):
    (tmp_path / "last.ckpt").mkdir()
    code = _exit_code(["consolidate", str(tmp_path / "last.ckpt"), str(tmp_path / "full.ckpt")])
    assert isinstance(code, str)  # SystemExit(message): printed to stderr, exit status 1, no traceback
    assert "is not a ModelParallelStrategy checkpoint directory" in code and "pass the `.ckpt` directory" in code
    assert list(tmp_path.iterdir()) == [tmp_path / "last.ckpt"]  # nothing written


def test_synthtag_export_passes_its_options_to_export_synthtag(tmp_path, capsys):
    manifest = run(["synthtag-export", str(tmp_path / "synth"), "3", "--tasks", "recolor", "relight", "--image_size", "16",
                    "--masks", "--no-tags", "--manifest_name", "m.jsonl"])
    assert manifest == tmp_path / "synth" / "m.jsonl" and str(manifest) in capsys.readouterr().out
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["task"] for r in rows] == ["recolor", "relight", "recolor"]
    assert all("mask" in r and "tags" not in r for r in rows)
    assert _exit_code(["synthtag-export", str(tmp_path / "other"), "2", "--tasks", "juggle"]) == 2  # argparse names the valid tasks
