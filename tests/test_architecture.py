"""The package's shape: no import cycles (function-local imports included), small modules,
and a localization package that knows neither the pipeline nor the training protocol."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "wsi_mil"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every wsi_mil module `path` imports, at any depth of the file (functions included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("wsi_mil")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("wsi_mil"):
                found.add(mod)
                found |= {f"{mod}.{a.name}" for a in node.names}  # `from . import x` names a module
    return found


@pytest.fixture(scope="module")
def graph():
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        deps = set()
        for imp in _imports(path):
            # resolve to the deepest existing module; a package import also runs its __init__
            while imp and imp not in modules:
                imp = imp.rsplit(".", 1)[0] if "." in imp else ""
            if imp and imp != name:
                deps.add(imp)
        edges[name] = deps
    return edges


def _cycle(edges):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(edges):
        if n not in state and (c := visit(n)):
            return c
    return None


def _packages_of(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycle_between_modules(graph):
    # a module importing its own package's __init__ is not a cycle worth reporting
    edges = {n: {m for m in deps if m not in _packages_of(n)} for n, deps in graph.items()}
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_localization_knows_neither_pipeline_nor_training(graph):
    for name, deps in graph.items():
        if name.startswith("wsi_mil.localization"):
            bad = {d for d in deps if d.startswith(("wsi_mil.pipeline", "wsi_mil.training", "wsi_mil.cli"))}
            assert not bad, f"{name} imports {bad}"


def test_modules_stay_small_and_the_cli_thin():
    sizes = {_module_name(p): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    assert max(sizes.values()) <= 400, max(sizes.items(), key=lambda kv: kv[1])
    assert sizes["wsi_mil.cli"] < 300


def test_formats_and_wsi_do_no_stage_work(graph):
    """Readers/formats are leaves of the data flow: they never call a stage or the runner."""
    for name, deps in graph.items():
        if name.startswith(("wsi_mil.wsi", "wsi_mil.formats")):
            bad = {
                d
                for d in deps
                if d.startswith(("wsi_mil.pipeline", "wsi_mil.training", "wsi_mil.localization"))
            }
            assert not bad, f"{name} imports {bad}"
