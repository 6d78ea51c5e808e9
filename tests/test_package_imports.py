"""How the package is cut: `tagmoe_lit` never imports the top-level `callbacks` package (the callbacks
import the package, not the reverse), no module sits on an import cycle (lazy imports inside functions
included; `if TYPE_CHECKING:` blocks, which never run, left out), and no file outgrows one concept
(400 lines)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tagmoe_lit"


def test_importing_every_module_of_the_package_never_imports_callbacks():
    script = (
        "import importlib, pkgutil, sys, tagmoe_lit\n"
        "names = sorted(m.name for m in pkgutil.walk_packages(tagmoe_lit.__path__, 'tagmoe_lit.'))\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m == 'callbacks' or m.startswith('callbacks.'))\n"
        "assert not leaked, f'importing tagmoe_lit pulled in {leaked}'\n"
        "assert 'tagmoe_lit.study.report' in sys.modules and len(names) > 40, names\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def import_graph() -> dict[str, set[str]]:
    """{module: package modules it imports anywhere in its file}; `from a.b import c` counts as a.b.c
    when c is a module, else as a.b."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def module_of(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        imported = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                imported |= {module_of(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported |= {module_of(f"{node.module}.{alias.name}") for alias in node.names}
        graph[module] = imported - {None, module}
    return graph


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A shortest import path start → … → start, or None."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append([*path, nxt])
    return None


def test_no_module_of_the_package_sits_on_an_import_cycle():
    graph = import_graph()
    assert "tagmoe_lit.study.runs" in graph["tagmoe_lit.study.report"]
    assert "tagmoe_lit.study.runner" not in graph["tagmoe_lit.study.report"]
    assert "tagmoe_lit.module" not in graph["tagmoe_lit.convert.files"] | graph["tagmoe_lit.convert.load"]
    cycles = {tuple(sorted(set(c))): c for c in (cycle_through(graph, m) for m in sorted(graph)) if c}
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles.values())


def test_no_file_of_the_package_exceeds_400_lines_and_the_lightning_module_300():
    lengths = {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {p: n for p, n in lengths.items() if n > 400}, "split these by concept"
    assert lengths["tagmoe_lit/module.py"] <= 300, "the LightningModule composes; move the math into its own file"
