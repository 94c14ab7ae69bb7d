"""The package's import graph: no circles, and every import points down the layers of DESIGN.md."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: lowest first; a module may import its own layer or any layer below it. Each prefix names a package and
#: everything below it, except ``capret`` itself (the root package), so a new module must be given a layer here.
#: Imports inside functions count like any other: an import that points up is a layering error wherever it
#: stands.
LAYERS: list[tuple[str, ...]] = [
    (
        "capret.config",
        "capret.registry",
        "capret.io",
        "capret.errors",
        "capret.console",
        "capret.locks",
        "capret.progress",
    ),
    ("capret.data",),
    ("captioning",),
    ("capret.models", "capret.losses", "capret.retrieval", "capret.evaluation"),
    ("capret.engine",),
    ("capret.inference", "capret.catalogue"),
    ("capret.tasks",),
    ("capret.api", "capret.testing", "capret"),
    ("capret.cli", "capret.quickstart", "captioning.cli", "capret.serve"),
]


#: root packages: their prefix names the package's ``__init__`` only, not the modules below it
_ROOTS = {"capret"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("capret", "captioning"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in targets if t in modules] or [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def _layer(module: str) -> int:
    best, depth = -1, -1
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            below = module.startswith(prefix + ".") and prefix not in _ROOTS
            if (module == prefix or below) and len(prefix) > depth:
                best, depth = level, len(prefix)
    if best < 0:
        raise AssertionError(f"module {module} is in no layer of tests/test_layout.py")
    return best


def test_no_import_cycles() -> None:
    edges = _imports(_modules())
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_imports_point_down() -> None:
    upward = [
        f"{src} (layer {_layer(src)}) imports {dst} (layer {_layer(dst)})"
        for src, targets in _imports(_modules()).items()
        for dst in targets
        if _layer(dst) > _layer(src)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_library_never_parses_command_lines() -> None:
    offenders = [
        name
        for name, path in _modules().items()
        if _layer(name) < len(LAYERS) - 1 and "import argparse" in path.read_text(encoding="utf-8")
    ]
    assert not offenders, offenders


def test_tasks_sit_above_inference_and_function_level_imports_count(tmp_path: Path) -> None:
    """Inference reads model folders, never task configs: tasks is the higher layer, and an import hidden in a
    function body is seen like any other."""
    assert _layer("capret.inference.cir.combiner") < _layer("capret.tasks.combiner") < _layer("capret.api")
    hidden = tmp_path / "hidden.py"
    hidden.write_text(
        "def load():\n    from capret.tasks.combiner import CombinerTaskConfig\n", encoding="utf-8"
    )
    edges = _imports({"capret.inference.hidden": hidden, "capret.tasks.combiner": hidden})
    assert edges["capret.inference.hidden"] == {"capret.tasks.combiner"}
    with pytest.raises(AssertionError, match="in no layer"):
        _layer("capret.newmodule")  # a new top-level module must be placed in a layer
