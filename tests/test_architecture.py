"""The package's architecture, checked from its source: the import graph of rtsed, kernels and train
(every import statement, at module level or inside a function, read with ast) has no cycle, and
arrows run one way down the layers below (docs/architecture.md draws them)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("rtsed", "kernels", "train")

# Layers, highest first. A module may import modules of its own layer group or of a strictly
# lower rank, never a higher one. Longest prefix wins.
LAYERS: dict[str, int] = {
    "train": 8,                 # python -m train.fit etc.: may use anything in rtsed
    "rtsed.live": 8,            # the module paths `python -m rtsed.live | detect | export | doctor`
    "rtsed.detect": 8,
    "rtsed.export": 8,
    "rtsed.doctor": 8,
    "rtsed.cli": 7,             # the command lines behind them
    "rtsed": 6,                 # the public API (rtsed/__init__.py)
    "rtsed.serve": 5,           # engines, steppers, Detector, decoder
    "rtsed.stream": 4,          # torch stream, ONNX export and runtime
    "rtsed.models": 3,          # layers, model, checkpoints, bundled detectors
    "rtsed.ops": 2,             # the ops the layers call
    "kernels": 2,               # Triton kernels (loaded by rtsed.ops, by name)
    "rtsed.backends": 1,        # backend decision, CPU helpers, native C++
    "rtsed.audio": 1,           # sources, files, log-mel front end
    "rtsed.config": 0,          # plain data
    "rtsed.metrics": 0,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports anywhere in its source."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                parts = parts[: len(parts) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
            # `from pkg import submodule` imports the submodule (and runs pkg/__init__, which is
            # pkg's own business); `from pkg import name` imports pkg.
            targets = subs if len(subs) == len(node.names) else [base] + subs
        else:
            continue
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _layer(module: str) -> str:
    candidates = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    assert candidates, f"{module} belongs to no layer: add it to LAYERS (and docs/architecture.md)"
    return max(candidates, key=len)


def test_every_module_has_a_layer():
    for module in _graph():
        _layer(module)


def test_no_import_cycle():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_arrows_run_down_the_layers():
    upward = []
    for module, targets in _graph().items():
        source = _layer(module)
        for target in targets:
            layer = _layer(target)
            if layer != source and LAYERS[layer] >= LAYERS[source]:
                upward.append(f"{module} ({source}) imports {target} ({layer})")
    assert not upward, "imports against the layer order:\n" + "\n".join(sorted(upward))


def test_the_checker_sees_cycles_and_upward_imports(tmp_path, monkeypatch):
    """The checks above would fail on a cycle and on an upward import (they are not vacuous)."""
    import sys

    this = sys.modules[__name__]
    monkeypatch.setattr(this, "_graph", lambda: {"rtsed.ops": {"rtsed.models.layers"},
                                                 "rtsed.models.layers": {"rtsed.ops"}})
    try:
        test_no_import_cycle()
    except AssertionError as exc:
        assert "rtsed.models.layers" in str(exc)
    else:
        raise AssertionError("a cycle went unseen")
    try:
        test_arrows_run_down_the_layers()
    except AssertionError as exc:
        assert "rtsed.ops (rtsed.ops) imports rtsed.models.layers" in str(exc)
    else:
        raise AssertionError("an upward import went unseen")
