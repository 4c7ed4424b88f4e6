"""The import rule of docs/architecture.md: a module imports only from its own floor or below.

Every `import xraylens...` / `from xraylens... import` in src/, at module level or inside a function,
is checked against FLOORS. A new module must be given a floor here (the test says so)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "xraylens"

# top-level module or package of xraylens -> floor (docs/architecture.md, "Layers")
FLOORS = {
    "errors": 0, "io": 0, "ops": 0, "progress": 0, "runtime": 0, "distributed": 0,
    "config": 1, "metrics": 1,
    "data": 2, "models": 2,
    "runs": 3,
    "train": 4, "explain": 4, "evaluate": 4, "segment": 4,
    "localize": 5, "tune": 5, "cycle": 5, "crossval": 5,
    "trust": 5,
    "report": 6, "serve": 6,
    "cli": 7, "demo": 7, "__main__": 7, "__init__": 7,
}  # fmt: skip


def _unit(module: str) -> str:
    """'xraylens.data.cache' -> 'data'; 'xraylens' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("xraylens")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("xraylens"):
            found.append((node.lineno, node.module))
    return found


def test_no_upward_imports():
    bad, unknown = [], []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        me = rel.parts[0].removesuffix(".py")
        if me not in FLOORS:
            unknown.append(str(rel))
            continue
        for line, module in _imports(path):
            other = _unit(module)
            if other not in FLOORS:
                unknown.append(module)
            elif FLOORS[other] > FLOORS[me]:
                bad.append(f"{rel}:{line} imports {module} (floor {FLOORS[other]} > {FLOORS[me]})")
    assert not unknown, f"give these a floor in FLOORS and docs/architecture.md: {sorted(set(unknown))}"
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_rule_catches_an_upward_import(tmp_path):
    # the check itself can fail: a floor-2 module importing the floor-3 run loader is reported
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from xraylens.runs import open_run\n")
    ((line, module),) = _imports(f)
    assert line == 2 and FLOORS[_unit(module)] > FLOORS["data"]
