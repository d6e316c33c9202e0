"""Structure of the ``bitgen`` package, read from its source (nothing is imported): no import
cycles, the layering rules of the design (DESIGN.md), and a size limit per module.

Every ``import bitgen.x`` / ``from bitgen.x import y`` counts, wherever it stands (module level,
inside a function, under ``if``). ``from bitgen.pkg import name`` points at ``bitgen.pkg.name``
when that is a module, else at ``bitgen.pkg`` (its ``__init__``, a module like any other). The
implicit import of a package's ``__init__`` when one of its submodules is imported is not an edge:
a package that re-exports its submodules would otherwise be a cycle by construction.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "bitgen"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_MODULE_LINES = 400


def module_name(path: Path) -> str:
    """``bitgen/data/cache.py`` -> ``bitgen.data.cache``; ``bitgen/data/__init__.py`` -> ``bitgen.data``."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <module> import ...`` as written in ``module``."""
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + is_package]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(module: str) -> set[str]:
    """Every module name ``module`` imports anywhere in its source (absolute; bitgen's and others)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(), str(MODULES[module]))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source)
    return found


def imports_of(module: str) -> set[str]:
    """The ``bitgen`` modules that ``module`` imports anywhere in its source."""
    return {name for name in imported_names(module) if name in MODULES and name != module}


GRAPH: dict[str, set[str]] = {m: imports_of(m) for m in MODULES}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (``[a, b, ..., a]``) through each strongly connected component of more
    than one module (Tarjan's algorithm, then a breadth-first search inside the component)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = {stack.pop()}
            while node not in component:
                component.add(stack.pop())
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_shortest_cycle(graph, c) for c in components if len(c) > 1]


def _shortest_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle inside ``component`` through its first module by name (breadth-first)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"{component} is strongly connected, so a cycle through {start} exists")


def is_cli(module: str) -> bool:
    return module.rsplit(".", 1)[-1].endswith("cli")


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Edges that break the DESIGN layering: ``bitgen.nn`` below eval/train/sampling; only CLI
    modules import CLI modules."""
    below_nn = ("bitgen.eval", "bitgen.train", "bitgen.sampling")
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if module.startswith("bitgen.nn.") and target.startswith(below_nn):
                bad.append(f"{module} -> {target} (bitgen.nn must not import eval/train/sampling)")
            elif is_cli(target) and not is_cli(module):
                bad.append(f"{module} -> {target} (only CLI modules may import a CLI module)")
    return bad


def test_the_graph_sees_function_level_and_relative_imports():
    # train/cli.py imports both inside run(); `from bitgen import parallel` is the submodule.
    assert {"bitgen.config", "bitgen.parallel"} <= GRAPH["bitgen.train.cli"]
    assert "bitgen" not in GRAPH["bitgen.train.cli"]
    assert "bitgen.data.corpus" in GRAPH["bitgen.data"]  # a package __init__ is a module
    relative = ast.parse("from . import corpus\nfrom ..codecs import BitCodec").body
    assert [_absolute("bitgen.data.cache", n) for n in relative] == ["bitgen.data", "bitgen.codecs"]
    assert [_absolute("bitgen.data", n) for n in relative] == ["bitgen.data", "bitgen.codecs"]


def test_find_cycles_reports_the_path():
    graph = {"a": {"b", "d"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({**graph, "c": {"d"}}) == []


def test_no_import_cycles():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layering():
    bad = layering_violations(GRAPH)
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_module_sizes():
    lines = {str(p.relative_to(ROOT.parent)): len(p.read_text().splitlines()) for p in MODULES.values()}
    too_long = [f"{path}: {n} lines" for path, n in sorted(lines.items()) if n > MAX_MODULE_LINES]
    assert not too_long, f"over {MAX_MODULE_LINES} lines; split by job: " + ", ".join(too_long)


def _reachable(graph: dict[str, set[str]], module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_row_cache_does_not_load_the_tokenizer_library():
    # The on-disk row cache is plain files; the `tokenizers` library is bitgen.tokenizers' business.
    loaded = {"bitgen.data.cache"} | _reachable(GRAPH, "bitgen.data.cache")
    assert not {m for m in loaded if any(n.split(".")[0] == "tokenizers" for n in imported_names(m))}
