"""The package's imports run one way, and ``import sparse_hetconv`` loads the core only.

Layers, from the bottom: index math and checks; the registered operator and the backends; the autotuner; the functional API;
the layers; converters, counting, fusion, FLOP tools and models; checkpoints and the spconv
layers; the measuring tools and the trainer; the command line. A module may import
modules of its own layer or below (never a cycle), never one above — imports inside functions
included, so a lazy import cannot hide an upward edge. The repository's ``benchmarks/`` (the
benchmark harness, the notebooks' tools) sits above them all: the package never imports it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparse_hetconv"

# (module prefix, layer); the longest matching prefix decides.
LAYERS = [
    ("sparse_hetconv._checks", 0), ("sparse_hetconv._memory_format", 0),
    ("sparse_hetconv._flop_formulas", 0), ("sparse_hetconv._files", 0), ("sparse_hetconv.pattern", 0),
    ("sparse_hetconv._probe", 0), ("sparse_hetconv._report", 0), ("sparse_hetconv._frozen", 0),
    ("sparse_hetconv.ops", 1), ("sparse_hetconv.backends", 1),
    ("sparse_hetconv.autotune", 2),
    ("sparse_hetconv.functional", 3),
    ("sparse_hetconv._base", 4), ("sparse_hetconv.masked", 4), ("sparse_hetconv.layouts", 4), ("sparse_hetconv._compact", 4),
    ("sparse_hetconv.sparse", 4),
    ("sparse_hetconv.convert", 5), ("sparse_hetconv.counting", 5), ("sparse_hetconv.batchnorm", 5),
    ("sparse_hetconv.flop_tools", 5), ("sparse_hetconv.models", 5), ("sparse_hetconv.shifted", 5),
    ("sparse_hetconv.permutation", 5), ("sparse_hetconv.probing", 5),
    ("sparse_hetconv.checkpoint", 6), ("sparse_hetconv.submanifold", 6),
    ("sparse_hetconv.profiling", 7), ("sparse_hetconv.training", 7), ("sparse_hetconv.deploy", 7),
    ("sparse_hetconv.cli", 8), ("sparse_hetconv.__main__", 8),
    ("sparse_hetconv", 6),  # the package itself: the core, never the tools
]
# What ``import sparse_hetconv`` must not load (beyond what ``import torch`` already has).
TOOLING = ("tqdm", "scipy", "resource", "matplotlib", "spconv", "triton", "fvcore", "ptflops", "onnx", "onnxruntime",
           "openvino", "torchao", "sparse_hetconv.profiling", "sparse_hetconv.training", "sparse_hetconv.cli",
           "sparse_hetconv.submanifold", "sparse_hetconv.flop_tools", "sparse_hetconv.deploy",
           "torch.utils.flop_counter")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int:
    matches = [(len(prefix), layer) for prefix, layer in LAYERS if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} has no layer in tests/test_imports.py: add it to LAYERS"
    return max(matches)[1]


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Package modules ``path`` imports, anywhere in the file (``from . import x`` names module x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            submodules = {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules}
            found |= submodules
            if node.module or not submodules:  # ``from . import x`` imports module x, not the package
                found.add(base)
    # Importing any module imports its parent packages first: those edges say nothing.
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path, set(MODULES)) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})"
              for name, deps in sorted(GRAPH.items()) for dep in sorted(deps)
              if layer_of(dep) > layer_of(name) and not dep.startswith(name + ".")]
    assert not upward, "imports must run one way:\n" + "\n".join(upward)


def test_the_package_never_imports_the_repository_benchmarks():
    def top_level(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.partition(".")[0])
        return names

    upward = sorted(name for name, path in MODULES.items() if "benchmarks" in top_level(path))
    assert not upward, f"the package imports benchmarks/ (which imports the package): {upward}"


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}

    def visit(name, trail):
        if state.get(name) == 1:
            cycle = trail[trail.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if state.get(name) == 2:
            return
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            # a package's __init__ importing its own submodules is not a cycle with them
            if not dep.startswith(name + "."):
                visit(dep, trail + [name])
        state[name] = 2

    for name in sorted(GRAPH):
        visit(name, [])


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_loads_the_core_only():
    proc = _fresh("import sys, torch\nbefore = set(sys.modules)\nimport sparse_hetconv\n"
                  "print('\\n'.join(sorted(set(sys.modules) - before)))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = proc.stdout.split()
    bad = [m for m in loaded if any(m == t or m.startswith(t + ".") for t in TOOLING)]
    assert not bad, f"import sparse_hetconv loaded tooling: {bad}"


def test_import_works_without_resource_and_profiling_too():
    """Windows has no ``resource`` module: the package and its measuring tools import without it."""
    proc = _fresh("import sys\nsys.modules['resource'] = None  # makes 'import resource' fail\n"
                  "import sparse_hetconv, sparse_hetconv.profiling\n"
                  "print(sparse_hetconv.profiling.memory._maxrss_bytes())")
    assert proc.returncode == 0, f"import failed without resource: {proc.stderr[-2000:]}"
    assert proc.stdout.split() == ["0"], "without resource the getrusage fallback reports 0"


def test_flop_counter_formulas_register_when_the_counter_is_imported_later():
    proc = _fresh("import torch, sparse_hetconv\nfrom torch.utils.flop_counter import flop_registry\n"
                  "print(torch.ops.aten.addmm_ in flop_registry)")
    assert proc.returncode == 0 and proc.stdout.split() == ["True"], proc.stderr[-2000:]
