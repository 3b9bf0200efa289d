"""The package imports one way.

The test reads every module of ``pyro_subnet`` with :mod:`ast` (no import is executed), resolves
relative imports, and builds the module import graph. An edge ``a -> b`` means that importing
``a`` runs ``b``: ``import p.q.r`` and ``from p.q import r`` also run the ``__init__`` of every
package on the way (``p``, ``p.q``) that is not already a package of ``a`` itself. Imports inside
functions count too, so a function-level import cannot hide a cycle.

It fails on

* a cycle between modules (package ``__init__`` modules included);
* a module that imports a module of a higher layer (:data:`LAYERS`);
* an import between two parts that must know nothing of each other (:data:`INDEPENDENT`);
* an import of a package module inside a function (the way cycles are dodged), or of an
  external module other than the heavy ones loaded only where they are used (:data:`LAZY`).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

import pytest

import pyro_subnet

PACKAGE = "pyro_subnet"
ROOT = Path(pyro_subnet.__file__).resolve().parent

#: Layers from the bottom up. A module belongs to the layer of the longest prefix that names it,
#: and may import modules of its own layer or of lower ones.
LAYERS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("data, distributions, metrics", ("pyro_subnet.data", "pyro_subnet.distributions", "pyro_subnet.metrics")),
    ("model bridge", ("pyro_subnet.nn",)),
    ("inference core", ("pyro_subnet.infer.distributed", "pyro_subnet.infer.randomness", "pyro_subnet.infer.draws",
                        "pyro_subnet.infer.links", "pyro_subnet.infer.curvature")),
    ("MAP", ("pyro_subnet.infer.map",)),
    ("subnetwork selection", ("pyro_subnet.infer.autoguide.subnet_selection",)),
    ("inference methods", ("pyro_subnet.infer.autoguide", "pyro_subnet.infer.mcmc", "pyro_subnet.infer.smc",
                           "pyro_subnet.infer.analytic")),
    ("inference", ("pyro_subnet.infer", "pyro_subnet.subnet")),
    ("diagnostics", ("pyro_subnet.diagnostics",)),
    ("main job", ("pyro_subnet.main_job",)),
    ("command line", ("pyro_subnet.cli",)),
    ("package", ("pyro_subnet",)),
)

#: ``(a, b)``: no module under ``a`` imports one under ``b``. Diagnostics sit above inference
#: but read the methods' objects by duck typing (``get_samples``, ``kernel``, ``model``).
INDEPENDENT: Tuple[Tuple[str, str], ...] = (
    ("pyro_subnet.diagnostics", "pyro_subnet.infer"),
    ("pyro_subnet.diagnostics", "pyro_subnet.subnet"),
)

#: External modules that may be imported inside a function: heavy ones, loaded only by the code
#: that needs them (ArviZ conversion, scikit-learn's data files, plotting).
LAZY = {"arviz", "xarray", "sklearn", "matplotlib"}


# ----------------------------------------------------------------------------------------------
# the graph

class Module:
    def __init__(self, name: str, path: Path):
        self.name = name
        self.path = path
        self.is_package = path.name == "__init__.py"
        self.tree = ast.parse(path.read_text(), str(path))

    @property
    def package(self) -> str:
        """The package that relative imports start from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


def discover(root: Path = ROOT, package: str = PACKAGE) -> Dict[str, Module]:
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join((package,) + parts)
        modules[name] = Module(name, path)
    return modules


def _resolve_relative(module: Module, level: int, target: Optional[str]) -> str:
    parts = module.package.split(".")
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([target] if target else []))


def _known(name: str, modules: Iterable[str]) -> Optional[str]:
    """The longest known module that ``name`` is or lies in (an attribute of a module)."""
    modules = set(modules)
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _ancestors(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_names(module: Module, modules: Iterable[str]) -> List[Tuple[str, ast.stmt]]:
    """``(full module or attribute name, node)`` of every import statement in ``module``."""
    modules = set(modules)
    out = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, node.level, node.module) if node.level else node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub if sub in modules else base, node))
    return out


def build_graph(modules: Dict[str, Module]) -> Dict[str, Set[str]]:
    """``{module: modules that importing it runs}``, within the package."""
    graph = {}
    for name, module in modules.items():
        own = set(_ancestors(name)) | {name}
        edges = set()
        for target, _ in imported_names(module, modules):
            target = _known(target, modules)
            if target is None:
                continue
            edges |= {t for t in _ancestors(target) + [target] if t not in own}
        graph[name] = edges
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or ``None``."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer_of(name: str, layers=LAYERS) -> Optional[int]:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def layer_violations(graph: Dict[str, Set[str]], layers=LAYERS) -> List[str]:
    out = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            la, lb = layer_of(a, layers), layer_of(b, layers)
            if lb > la:
                out.append(f"{a} ({layers[la][0]}) imports {b} ({layers[lb][0]})")
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def independence_violations(graph: Dict[str, Set[str]], rules=INDEPENDENT) -> List[str]:
    return [f"{a} imports {b}, but {pa} knows nothing of {pb}"
            for a, targets in sorted(graph.items()) for b in sorted(targets)
            for pa, pb in rules if _under(a, pa) and _under(b, pb)]


def function_level_imports(modules: Dict[str, Module]) -> List[str]:
    """Imports inside a function body that are not of a :data:`LAZY` external module."""
    out = []
    for name, module in sorted(modules.items()):
        top = name.split(".")[0]
        for fn in ast.walk(module.tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    roots = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    roots = [top if node.level else node.module.split(".")[0]]
                else:
                    continue
                for root in roots:
                    if root not in LAZY:
                        out.append(f"{name}:{node.lineno} imports {root} inside {fn.name}()")
    return out


# ----------------------------------------------------------------------------------------------
# the package

@pytest.fixture(scope="module")
def modules():
    return discover()


@pytest.fixture(scope="module")
def graph(modules):
    return build_graph(modules)


def test_every_module_has_a_layer(modules):
    assert [m for m in modules if layer_of(m) is None] == []


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_layer(graph):
    assert layer_violations(graph) == []


def test_independent_parts_do_not_import_each_other(graph):
    assert independence_violations(graph) == []


def test_no_function_level_import(modules):
    assert function_level_imports(modules) == []


def test_the_graph_sees_the_package_imports(graph):
    # A sample of edges the package is built on: if the walker missed relative imports or
    # package __init__ modules, these would be absent and the checks above would pass vacuously.
    assert "pyro_subnet.infer.curvature" in graph["pyro_subnet.infer.autoguide.subnet_laplace"]
    assert "pyro_subnet.infer.curvature" in graph["pyro_subnet.infer.autoguide.subnet_selection.strategies"]
    assert "pyro_subnet.infer" in graph["pyro_subnet"]
    assert "pyro_subnet.nn" in graph["pyro_subnet.infer.map"]          # through the package __init__


# ----------------------------------------------------------------------------------------------
# the checks themselves, on small synthetic packages

def _write(root: Path, files: Dict[str, str]) -> Dict[str, Module]:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return discover(root / "pkg", "pkg")


def test_a_cycle_through_a_package_init_is_found(tmp_path):
    modules = _write(tmp_path, {
        "__init__.py": "from . import low, high\n",
        "low/__init__.py": "from .core import f\n",
        "low/core.py": "def f():\n    from ..high import g\n    return g\n",   # dodged in a function
        "high/__init__.py": "from ..low.core import f\ng = 1\n",
    })
    graph = build_graph(modules)
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"pkg.low.core", "pkg.high"} <= set(cycle)


def test_an_acyclic_graph_passes_and_a_higher_import_is_named(tmp_path):
    modules = _write(tmp_path, {
        "__init__.py": "from . import low, high\n",
        "low/__init__.py": "from . import core\n",
        "low/core.py": "import math\n",
        "high/__init__.py": "from ..low import core\n",
        "high/bad.py": "",
        "low/leak.py": "from pkg.high import bad\n",
    })
    graph = build_graph(modules)
    assert find_cycle(graph) is None
    layers = (("low", ("pkg.low",)), ("high", ("pkg.high",)), ("top", ("pkg",)))
    assert layer_violations(graph, layers) == ["pkg.low.leak (low) imports pkg.high (high)",
                                               "pkg.low.leak (low) imports pkg.high.bad (high)"]
    assert independence_violations(graph, (("pkg.low", "pkg.high"),)) == [
        "pkg.low.leak imports pkg.high, but pkg.low knows nothing of pkg.high",
        "pkg.low.leak imports pkg.high.bad, but pkg.low knows nothing of pkg.high"]


def test_function_level_imports_are_found(tmp_path):
    modules = _write(tmp_path, {
        "__init__.py": "",
        "a.py": "def f():\n    import numpy\n    import matplotlib.pyplot\n    from . import b\n",
        "b.py": "",
    })
    found = function_level_imports(modules)
    assert len(found) == 2 and found[0] == "pkg.a:2 imports numpy inside f()" and found[1] == "pkg.a:4 imports pkg inside f()"
