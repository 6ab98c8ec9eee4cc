"""The package's layers, enforced: no module imports a higher layer, no import cycles, no private
names imported across modules. ``LAYERS`` is the architecture (docs/ARCHITECTURE.md draws it);
imports inside functions and ``import_module("pqd...")`` strings count like top-level imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pqd

# bottom up: a module may import its own layer and the layers below it, never one above
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("pqd.errors", "pqd.config", "pqd.safety")),
    ("models and data", ("pqd.models", "pqd.data")),
    ("compression primitives", ("pqd.compress",)),
    ("training", ("pqd.train",)),
    ("deployment and measurement", ("pqd.deploy", "pqd.measure")),
    ("structured search", ("pqd.structured",)),
    ("stages", ("pqd.stages",)),
    ("run", ("pqd.run",)),
    ("commands", ("pqd.commands", "pqd.integrations")),
    ("entry points", ("pqd.cli", "pqd.recipes", "pqd")),
)


def layer_of(module: str) -> int:
    """Index in ``LAYERS`` of the longest prefix that names ``module`` (its package or itself)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise KeyError(f"{module} is in no layer: add it to LAYERS (and docs/ARCHITECTURE.md)")
    return best


def module_sources(root: Path) -> dict[str, str]:
    """``{'pqd.x.y': source}`` for every .py file under ``root`` (the pqd package folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path.read_text()
    return out


def _resolve(name: str, modules: set[str]) -> str | None:
    """The pqd module ``name`` refers to (``pqd.a.b.attr`` -> ``pqd.a.b``), or None outside pqd."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _called(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def imports(module: str, source: str, modules: set[str]) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every pqd import in ``source``:
    import statements at any depth, ``import_module('pqd...')`` / ``__import__`` calls, and string
    constants that name a pqd module (lazy tables), all counted."""
    tree = ast.parse(source)
    logger_names = {
        id(a) for n in ast.walk(tree) if isinstance(n, ast.Call) and _called(n) == "getLogger" for a in n.args
    }
    package = module if any(m.startswith(module + ".") for m in modules) else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                target = _resolve(a.name, modules)
                if target:
                    out.append((target, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:
                    out.append((sub, None, node.lineno))
                else:
                    target = _resolve(base, modules)
                    if target:
                        out.append((target, a.name, node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in logger_names:
            text = node.value.partition(":")[0]
            if text.startswith("pqd.") and text in modules:
                out.append((text, None, node.lineno))
    return out


def check(sources: dict[str, str]) -> list[str]:
    """Every breach of the layer rules in ``sources`` (``{'pqd.x': source}``), as readable lines."""
    modules = set(sources)
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, source in sources.items():
        low = layer_of(module)
        for target, name, line in imports(module, source, modules):
            if target == module:
                continue
            graph[module].add(target)
            high = layer_of(target)
            if high > low:
                problems.append(
                    f"upward import: {module}:{line} (layer '{LAYERS[low][0]}') imports {target} "
                    f"(layer '{LAYERS[high][0]}')"
                )
            if name is not None and name.startswith("_") and not name.startswith("__"):
                problems.append(f"private import: {module}:{line} imports {name} from {target}")
    problems += [f"import cycle among: {', '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


PACKAGE = Path(pqd.__file__).resolve().parent


def test_the_package_keeps_its_layers():
    problems = check(module_sources(PACKAGE))
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    for module in module_sources(PACKAGE):
        layer_of(module)  # raises for a module no layer names


def test_architecture_doc_draws_the_layer_table():
    doc = (PACKAGE.parent.parent / "docs" / "ARCHITECTURE.md").read_text()
    for name, prefixes in LAYERS:
        assert name in doc, name
        for p in prefixes:
            assert f"`{p}`" in doc, p


SYNTHETIC = {
    "pqd": "",
    "pqd.errors": "class PqdError(Exception): ...\n",
    "pqd.models": "from pqd.errors import PqdError\n",
    "pqd.stages": "from pqd.models import x\n",
    "pqd.run": "import pqd.stages\n",
}


def test_checker_accepts_a_clean_tree():
    assert check(SYNTHETIC) == []


def test_checker_finds_an_upward_import_inside_a_function():
    bad = SYNTHETIC | {"pqd.models.extra": "def f():\n    from pqd.run import y\n"}
    assert check(bad) == ["upward import: pqd.models.extra:2 (layer 'models and data') imports pqd.run (layer 'run')"]


def test_checker_finds_an_upward_import_module_string():
    bad = SYNTHETIC | {
        "pqd.models.extra": "from importlib import import_module\ndef f():\n    return import_module('pqd.stages')\n"
    }
    assert check(bad) == [
        "upward import: pqd.models.extra:3 (layer 'models and data') imports pqd.stages (layer 'stages')"
    ]


def test_checker_finds_a_cycle_within_a_layer():
    bad = SYNTHETIC | {
        "pqd.stages.a": "from pqd.stages.b import f\n",
        "pqd.stages.b": "def f():\n    import pqd.stages.a\n",
    }
    assert check(bad) == ["import cycle among: pqd.stages.a, pqd.stages.b"]


def test_checker_finds_a_private_name_imported_across_modules():
    bad = SYNTHETIC | {"pqd.stages": "from pqd.models import _helper\n"}
    assert check(bad) == ["private import: pqd.stages:1 imports _helper from pqd.models"]


@pytest.mark.parametrize("module", ["pqd.config", "pqd.errors"])
def test_core_modules_import_no_torch(module):
    source = module_sources(PACKAGE)[module]
    names = [a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "torch"]


def test_the_timing_worker_and_the_package_import_no_torch():
    """An ONNX timing worker (pqd.measure.worker) and ``import pqd`` keep torch out of the process."""
    import subprocess
    import sys

    code = "import sys, pqd, pqd.measure.worker, pqd.config; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
