"""The repository's layout rules, checked by reading the source (nothing is imported or run)."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_test_modules_stand_alone():
    """No file under tests/ imports a test module or conftest (STYLE.md, "Tests stand alone"):
    fixtures come from conftest.py through pytest, plain helpers from helpers.py."""
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "conftest" or top.startswith("test_"):
                    offenders.append(f"{path.name}:{node.lineno} imports {name}")
    assert not offenders, "import helpers from helpers.py instead: " + "; ".join(offenders)
