"""Resolving ``--model M``: a path if it exists, else a detector bundled with the package.

Bundled detectors live in ``rtsed/models/<name>.pt`` (with a model card ``<name>.md``), so
``--model dnd_7_10`` or ``--model dnd_7_10.pt`` works on a fresh install. Beside each may lie its
int8 streaming graph ``<name>_int8.onnx`` (``python -m train.bundle_int8``), which
``--backend onnx --model dnd_7_10_int8.onnx`` runs.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent  # the weights and model cards sit beside this module


class ModelNotFoundError(FileNotFoundError):
    """--model named neither an existing file nor a bundled detector."""


def bundled_models() -> list[str]:
    """Names of the detectors shipped inside the package."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.pt"))


def bundled_graphs() -> list[str]:
    """File names of the ONNX graphs shipped beside the bundled detectors (their int8 step graphs)."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.glob("*.onnx"))


def resolve_model(spec: str | Path) -> Path:
    """The file ``--model spec`` refers to: an existing path (.pt or .onnx) first, then
    ``rtsed/models/<spec>.pt`` (with or without the .pt suffix), or for a name ending in .onnx
    the bundled graph ``rtsed/models/<spec>``."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    name = path.name.removesuffix(".pt")
    bundled = BUNDLED_DIR / (name if name.endswith(".onnx") else f"{name}.pt")
    if path.parent == Path(".") and bundled.is_file():
        return bundled
    available = bundled_models() + bundled_graphs()
    listing = ", ".join(available) if available else "none in this install"
    raise ModelNotFoundError(
        f"--model {spec}: no such file, and no bundled detector of that name. Tried: {path.resolve()}"
        f"{', ' + str(bundled) if path.parent == Path('.') else ''}. Bundled detectors: {listing}. "
        "Train one with python -m train.fit."
    )
