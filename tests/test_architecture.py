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
    "rtsed.serve.__main__": 8,  # python -m rtsed.serve (its command line is rtsed.cli.serve)
    "rtsed.worker": 8,          # python -m rtsed.worker (its command line is rtsed.cli.worker)
    "rtsed.cli": 7,             # the command lines behind them
    "rtsed": 6,                 # the public API (rtsed/__init__.py)
    "rtsed.cluster": 6,         # gateway and workers on NATS: built on rtsed.serve, which never imports it
    "rtsed.serve": 5,           # engines, steppers, Detector, decoder
    "rtsed.stream": 4,          # torch stream, ONNX export and runtime
    "rtsed.models": 3,          # layers, model, checkpoints, bundled detectors
    "rtsed.ops": 2,             # the ops the layers call
    "kernels": 2,               # Triton kernels (loaded by rtsed.ops, by name)
    "rtsed.backends": 1,        # backend decision, CPU helpers, native C++
    "rtsed.audio": 1,           # sources, files, log-mel front end
    "rtsed.config": 0,          # plain data
    "rtsed.metrics": 0,
    "rtsed.atomic": 0,          # output files written whole or not at all
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


# ----------------------------------------------------------------------------------------------
# Ops are functions of tensors: no back-calls into the layers
# ----------------------------------------------------------------------------------------------

# Ops that take a layer or module, by file: none. An entry must still be one (a converted op
# left on it fails the test below), so the list can only shrink.
NOT_YET_FUNCTIONAL: dict[str, set[str]] = {}


# Parameters annotated with these alone are plain values: numbers, a fold cache (a plain dict),
# or another op (``Callable``: an op passed to a composition, e.g. the Triton-or-reference choice).
PLAIN = {"int", "float", "bool", "str", "dict", "Callable"}
TENSOR_OR_PLAIN = PLAIN | {"Tensor", "None", "tuple", "list", "Optional", "torch", "dtype"}


def _annotation_names(annotation: ast.expr) -> set[str]:
    """The names an annotation mentions (``"FrequencyBlock"``, ``nn.Linear``, ``Tensor | None``)."""
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        annotation = ast.parse(annotation.value, mode="eval").body
    names = set()
    for sub in ast.walk(annotation):
        if isinstance(sub, ast.Name):
            names.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            names.add(sub.attr)
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            names |= _annotation_names(sub)
    return names


def _back_calls(path: Path, public_only: bool) -> dict[str, list[str]]:
    """For each function in ``path`` (module level; with ``public_only`` only those without a
    leading underscore), its parameters annotated as something other than tensors and plain
    values (``block: "FrequencyBlock"``), and the uses of its parameters that a tensor does not
    have: an attribute that torch.Tensor lacks (``layer.conv``, ``block.eval_operands``,
    ``state.write_pos``) or a call of the parameter itself (``classifier(x)``). Parameters
    annotated as plain values (PLAIN) are skipped."""
    import torch

    found: dict[str, list[str]] = {}
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or (public_only and node.name.startswith("_")):
            continue
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        params = {a.arg for a in args
                  if a.annotation is None or not _annotation_names(a.annotation) <= PLAIN | {"None"}}
        uses = [f"{a.arg}: {ast.unparse(a.annotation)}" for a in args
                if a.annotation is not None and not _annotation_names(a.annotation) <= TENSOR_OR_PLAIN]
        for sub in ast.walk(node):
            if (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id in params
                    and not hasattr(torch.Tensor, sub.attr)):
                uses.append(f"{sub.value.id}.{sub.attr}")
            elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id in params:
                uses.append(f"{sub.func.id}(...)")
        if uses:
            found[node.name] = sorted(set(uses))
    return found


def _ops_files() -> list[tuple[Path, bool]]:
    return ([(p, False) for p in sorted((REPO / "rtsed" / "ops").rglob("*.py"))]
            + [(p, True) for p in sorted((REPO / "kernels").glob("*.py"))])


def test_ops_take_tensors_not_layers():
    """rtsed.ops and the kernels' launchers are functions of tensors (and plain numbers): they
    never read a layer's attributes or call a module they were handed. A layer calls an op with
    its parameters; the op never calls back into the layer (an arrow the import graph cannot see,
    since the layer object arrives as an argument)."""
    offenders = []
    for path, public_only in _ops_files():
        rel = str(path.relative_to(REPO))
        allowed = NOT_YET_FUNCTIONAL.get(rel, set())
        found = _back_calls(path, public_only)
        offenders += [f"{rel}: {name} uses {uses}" for name, uses in found.items() if name not in allowed]
        offenders += [f"{rel}: {name} is listed in NOT_YET_FUNCTIONAL but is functional now (remove it)"
                      for name in allowed if name not in found]
    assert not offenders, "ops that call back into layers:\n" + "\n".join(offenders)


def test_the_back_call_check_is_not_vacuous(tmp_path):
    """The check above catches an op that reads a layer's parameters or calls a module."""
    src = tmp_path / "op.py"
    src.write_text("def op(layer, x, n: int):\n    return layer.conv_relu_bn(x) + layer.bn.weight + n\n"
                   "def head(classifier, h):\n    return classifier(h.transpose(1, 2))\n"
                   "def passes(block: 'FrequencyBlock', x: Tensor):\n    return op(block, x, 1)\n"
                   "def fine(x, weight: Tensor | None, stride: int):\n    return x.matmul(weight).view(x.shape[0], -1)\n")
    assert _back_calls(src, public_only=False) == {"op": ["layer.bn", "layer.conv_relu_bn"],
                                                    "head": ["classifier(...)"],
                                                    "passes": ["block: 'FrequencyBlock'"]}
