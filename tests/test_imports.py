"""The package reads bottom-up: no import cycle between its modules, counting imports inside functions too, and
no Lightning, Hydra or transformers below the entry points that need them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "musicflamingo"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its file (`from a import b` counts `a.b` when `b` is
    a module, else `a`)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [
                    f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module
                    for a in node.names
                ]
            else:
                continue
            edges.update(t for t in targets if t.split(".")[0] == "musicflamingo" and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "musicflamingo.engine" in graph["musicflamingo.model.musicflamingo"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_import_no_framework():
    """Plain torch below the entry points: no Lightning/Hydra under model/, engine, chat, processor, inference;
    transformers nowhere in the package."""
    plain = [PACKAGE / "model", PACKAGE / "engine.py", PACKAGE / "chat.py", PACKAGE / "processor.py"]
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import transformers" not in text and "from transformers" not in text, path
        if any(path == p or p in path.parents for p in plain):
            for framework in ("lightning", "hydra", "omegaconf"):
                assert f"import {framework}" not in text and f"from {framework}" not in text, (
                    path,
                    framework,
                )
