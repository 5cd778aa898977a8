"""rtsed: real-time sound event detection (Drossos et al. 2020, DnD-SED), streaming from the first line.

The public API:

    build_model(name)        an untrained model of the paper's grid (base, dws, dil_K_d, dnd_K_d[, _causal])
    load_model(path)         a checkpoint's model, rebuilt from its own config (eval mode)
    load_detector(path)      front end + normalisation + model of a checkpoint (audio in, logits out)
    save_checkpoint(...)     write config + weights + metadata atomically
    ModelStream              stateful streaming over one or many streams (frames in, logits out)
    register_temporal(name, factory)   a new temporal family that configs and checkpoints can name
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rtsed.serve.detector import Detector
    from rtsed.models.model import SEDModel

# Where each public name lives. Imported on first use (PEP 562), so that a process which needs
# only part of the package (a gateway relaying audio, the config and protocol modules) does not
# load torch and the model code with it.
_EXPORTS = {
    "Checkpoint": "rtsed.models.checkpoint", "CheckpointError": "rtsed.models.checkpoint",
    "load_checkpoint": "rtsed.models.checkpoint", "save_checkpoint": "rtsed.models.checkpoint",
    "TUT_SED_2016_LABELS": "rtsed.config", "ConfigError": "rtsed.config", "DecoderConfig": "rtsed.config",
    "DetectorConfig": "rtsed.config", "FrontendConfig": "rtsed.config", "ModelConfig": "rtsed.config",
    "NormalizationStats": "rtsed.config",
    "AudioStream": "rtsed.serve.detector", "Detector": "rtsed.serve.detector",
    "register_temporal": "rtsed.models.families",
    "SEDModel": "rtsed.models.model", "build_model": "rtsed.models.model",
    "count_parameters": "rtsed.models.model", "macs_per_frame": "rtsed.models.model",
    "ModelStream": "rtsed.stream.model_stream", "StepOutput": "rtsed.stream.model_stream",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rtsed' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"


def load_model(path, map_location="cpu") -> SEDModel:
    """The model of a checkpoint, rebuilt from the checkpoint's own config, in eval mode."""
    from rtsed.models.checkpoint import load_checkpoint

    return load_checkpoint(path, map_location).model


def load_detector(path, map_location="cpu") -> Detector:
    """Front end, normalisation and model of a checkpoint, ready for audio (eval mode)."""
    from rtsed.models.checkpoint import load_checkpoint
    from rtsed.serve.detector import Detector

    ckpt = load_checkpoint(path, map_location)
    return Detector(ckpt.config, ckpt.model).to(map_location).eval()


__all__ = sorted([*_EXPORTS, "load_detector", "load_model"])
