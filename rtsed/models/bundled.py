"""Resolving ``--model M``: a path if it exists, else a detector bundled with the package.

Bundled detectors live in ``rtsed/models/<name>.pt`` (with a model card ``<name>.md``), so
``--model dnd_7_10`` or ``--model dnd_7_10.pt`` works on a fresh install.
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


def resolve_model(spec: str | Path) -> Path:
    """The file ``--model spec`` refers to: an existing path (.pt or .onnx) first, then
    ``rtsed/models/<spec>.pt`` (with or without the .pt suffix)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    name = path.name.removesuffix(".pt")
    bundled = BUNDLED_DIR / f"{name}.pt"
    if path.parent == Path(".") and bundled.is_file():
        return bundled
    available = bundled_models()
    listing = ", ".join(available) if available else "none in this install"
    raise ModelNotFoundError(
        f"--model {spec}: no such file, and no bundled detector of that name. Tried: {path.resolve()}"
        f"{', ' + str(bundled) if path.parent == Path('.') else ''}. Bundled detectors: {listing}. "
        "Train one with python -m train.fit."
    )
