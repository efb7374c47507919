"""No module imports a module that imports it, directly or around a circle: the import graph of the package, the
training and benchmark folders and the demo, read from the sources (every import statement, also those inside
functions and under TYPE_CHECKING), has no cycle. The package imports nothing from train/, benchmarks/ or the demo;
benchmark scripts import the shared helpers, never one another."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("pipeline_diffews", "train", "benchmarks", "app.py", "demo_utils.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Module name -> source file, for every .py file of SCANNED."""
    found = {}
    for entry in SCANNED:
        path = ROOT / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else []
        found.update((module_name(f), f) for f in files)
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that `name` imports: `import a.b`, `from a.b import c` (c itself when it is a module),
    relative imports resolved against the module's package. Parent packages imported implicitly are not edges."""

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module
            for alias in node.names:
                submodule = f"{full}.{alias.name}"
                targets.add(submodule if submodule in known else resolve(full))
    targets.discard(None)
    targets.discard(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    return "; ".join(f"{a} -> {b}" for a in component for b in sorted(graph[a] & members))


def test_the_scanner_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_is_read_from_the_sources():
    graph = import_graph()
    assert "pipeline_diffews.official" in graph["pipeline_diffews.segment"]
    assert "pipeline_diffews.hub" in graph["pipeline_diffews.official"]
    assert "pipeline_diffews.publish" in graph["pipeline_diffews.cli"]
    assert "train.data.protocol" in graph["train.data.base"] and "train.data.base" in graph["train.data.episodes"]
    assert "pipeline_diffews" in graph["train.evaluate"] and "train.data" in graph["train.evaluate"]


@pytest.mark.parametrize("folder", ["pipeline_diffews", "train", None])
def test_no_module_imports_a_module_that_imports_it(folder):
    graph = import_graph()
    if folder is not None:
        inside = {n for n in graph if n.split(".")[0] == folder}
        graph = {n: graph[n] & inside for n in inside}
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(describe(c, graph) for c in found)


def test_the_package_imports_nothing_from_training_benchmarks_or_the_demo():
    outside = {n: sorted(t for t in ts if not t.startswith("pipeline_diffews"))
               for n, ts in import_graph().items() if n.startswith("pipeline_diffews")}
    assert not {n: ts for n, ts in outside.items() if ts}


def test_benchmarks_import_no_other_benchmark_script_and_leave_the_path_alone():
    """Each benchmark script imports the shared helpers, the package and train/, never another script (a module that
    runs as `python -m benchmarks.<name>`), and none patches `sys.path`."""
    known, graph = modules(), import_graph()
    benchmarks = {n: p.read_text(encoding="utf-8") for n, p in known.items() if n.split(".")[0] == "benchmarks"}
    scripts = {n for n, text in benchmarks.items() if re.search(r"^if __name__ == .__main__.:", text, re.M)}
    assert len(scripts) > 1
    assert not {n: sorted(graph[n] & scripts) for n in benchmarks if graph[n] & scripts}
    assert not [n for n, text in benchmarks.items() if re.search(r"\bsys\.path\.(insert|append|extend)\b", text)]
