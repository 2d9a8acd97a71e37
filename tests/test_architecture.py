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


def test_only_the_cli_imports_the_parsers():
    """Modules import their constants from bench.settings; bench.arguments (the parsers) is the CLI's."""
    graph = import_graph()
    assert "bench.arguments" in graph["bench.cli"]  # edges to it are found
    importers = {m for m, edges in graph.items() if "bench.arguments" in edges} - {"bench.cli"}
    assert not importers, f"import constants from bench.settings instead: {sorted(importers)}"


def test_commands_and_records_import_no_report():
    """Commands measure and write records; bench.cli renders the report afterwards. No arrow runs from
    run, memory, perf or records up into report."""
    graph = import_graph()
    assert {"bench.report.build", "bench.report.measurements"} <= graph["bench.cli"]  # lazy imports count

    def within(module: str, *packages: str) -> bool:
        return any(module == p or module.startswith(f"{p}.") for p in packages)

    edges = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if within(module, "bench.run", "bench.memory", "bench.perf", "bench.records")
        for target in targets
        if within(target, "bench.report")
    )
    assert not edges, f"render reports in bench.cli (Command.report), not in the command: {edges}"


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


MAX_FUNCTION_LINES = 60
"""No function or method is longer than this (from its ``def`` line to its last, decorators excluded)."""


def test_no_function_is_longer_than_sixty_lines():
    too_long = []
    for module, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(
                        f"{module}.{node.name} ({path.relative_to(REPO)}:{node.lineno}, {lines} lines)"
                    )
    assert not too_long, f"split into named steps, each at most {MAX_FUNCTION_LINES} lines: {too_long}"


METHOD_NAMES_ALLOWED = {"bench/report/paper.py"}
"""Where the harness may compare a value with a method's name: the paper's tables, whose rows are the
paper's methods. Everywhere else it asks the method (its config's hooks: ``label``, ``family``,
``ablation_axes``, ``changes_backbone``)."""


def method_names() -> set[str]:
    """Every registered method's name and every PEFT tuner's (``peft-<tuner>`` families)."""
    import snell
    from baselines.hf_peft import TUNERS

    return set(snell.list_methods()) | set(TUNERS)


def _literal_strings(node: ast.AST):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.Tuple | ast.List | ast.Set):
        for element in node.elts:
            yield from _literal_strings(element)


def method_name_comparisons(source: str, names: set[str]) -> list[int]:
    """Lines of ``source`` that compare a value with a literal one of ``names``: ``==`` / ``!=``, ``in`` /
    ``not in`` a literal tuple, list or set, ``.startswith`` / ``.endswith`` (``.str``'s too) / ``.isin``,
    or a ``case``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            equality = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)
            operands = (
                [node.left, *node.comparators] if any(isinstance(o, equality) for o in node.ops) else []
            )
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            operands = node.args if node.func.attr in ("startswith", "endswith", "isin") else []
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        else:
            continue
        if {s for operand in operands for s in _literal_strings(operand)} & names:
            lines.append(node.lineno)
    return sorted(set(lines))


def test_the_method_name_check_finds_comparisons():
    source = (
        'a = method == "snell"\n'
        "b = df.method.str.startswith('peft')\n"
        'c = m in ("full", "other")\n'
        'd = tuner != "dora"\n'
        'e = df[df.method.isin(["linear"])]\n'
        'f = name == "snell-8" or kind in ("x", "y") or "snell" + suffix\n'
    )
    assert method_name_comparisons(source, method_names()) == [1, 2, 3, 4, 5]


def test_the_harness_asks_methods_instead_of_comparing_their_names():
    """No module under bench/ picks runs or code paths by comparing a method's name (``method ==
    "snell"``): a new method would be left out, or taken for another; the method says what it is."""
    names = method_names()
    found = []
    for path in sorted((REPO / "bench").rglob("*.py")):
        where = path.relative_to(REPO).as_posix()
        if where not in METHOD_NAMES_ALLOWED:
            text = path.read_text()
            lines = text.splitlines()
            found += [f"{where}:{n}: {lines[n - 1].strip()}" for n in method_name_comparisons(text, names)]
    assert not found, (
        "ask the method's config (label, family, ablation_axes, changes_backbone):\n" + "\n".join(found)
    )
