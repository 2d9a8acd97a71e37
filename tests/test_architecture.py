"""The layout stays a layered graph: no import cycle among snell, baselines and bench (read with ast).

Every import statement counts, at module level or inside a function: a lazy import is still a
dependency. An edge goes to the most specific project module named (``from snell.core.wrap import x`` ->
``snell.core.wrap``); a package's ``__init__`` is its own node.
"""

import ast
from pathlib import Path

from tests.harness import REPO

PACKAGES = ("snell", "baselines", "bench")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        edges = set()
        for name in imported_names(module, path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add(name)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_project():
    graph = import_graph()
    assert {"snell.core.registry", "baselines.lora", "bench.run.runner"} <= set(graph)
    assert "snell.core.registry" in graph["baselines.lora"]  # edges are found
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_method_framework_is_neutral():
    """The framework modules every method imports import no method (SNELL's or a baseline)."""
    graph = import_graph()
    neutral = ("snell.core.registry", "snell.core.validation", "snell.core.wrap", "snell.core.adapter")
    methods = {
        "snell.tuners.snell.config",
        "snell.tuners.snell.model",
        "snell.tuners.snell.layer",
        "snell.tuners.snell.kernels",
        "snell.tuners.snell.sparsify",
    }
    methods |= {m for m in graph if m.startswith("baselines")}
    for module in neutral:
        assert not graph[module] & methods, (module, graph[module] & methods)


MAX_POSITIONAL = 4
"""Public functions take at most this many positional parameters; the rest are keyword-only."""
FIXED_CONVENTIONS = ("jit", "custom_op")
"""Decorators whose calling convention is not ours to choose: Triton kernels, torch custom ops (their
schema comes from the signature and is called positionally by the dispatcher)."""


def decorator_names(node: ast.FunctionDef) -> set[str]:
    names = set()
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        names.add(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", ""))
    return names


def test_public_functions_of_many_parameters_take_the_rest_by_keyword():
    too_many = []
    for module, path in project_modules().items():
        if path.name.startswith("test_"):
            continue
        for node in ast.parse(path.read_text()).body:  # module-level functions: the public API
            public = isinstance(node, ast.FunctionDef) and not node.name.startswith("_")
            if public and not decorator_names(node) & set(FIXED_CONVENTIONS):
                positional = [a.arg for a in node.args.posonlyargs + node.args.args]
                if len(positional) > MAX_POSITIONAL:
                    too_many.append(f"{module}.{node.name}({', '.join(positional)})")
    assert not too_many, f"make the later parameters keyword-only (after *): {too_many}"
