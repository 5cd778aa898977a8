"""rtsed: real-time sound event detection (Drossos et al. 2020, DnD-SED), streaming from the first line.

The public API:

    build_model(name)        an untrained model of the paper's grid (base, dws, dil_K_d, dnd_K_d[, _causal])
    load_model(path)         a checkpoint's model, rebuilt from its own config (eval mode)
    load_detector(path)      front end + normalisation + model of a checkpoint (audio in, logits out)
    save_checkpoint(...)     write config + weights + metadata atomically
    ModelStream              stateful streaming over one or many streams (frames in, logits out)
    register_temporal(name, factory)   a new temporal family that configs and checkpoints can name
"""

from rtsed.models.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from rtsed.config import (
    TUT_SED_2016_LABELS,
    ConfigError,
    DecoderConfig,
    DetectorConfig,
    FrontendConfig,
    ModelConfig,
    NormalizationStats,
)
from rtsed.serve.detector import AudioStream, Detector
from rtsed.models.families import register_temporal
from rtsed.models.model import SEDModel, build_model, count_parameters, macs_per_frame
from rtsed.stream.model_stream import ModelStream, StepOutput

__version__ = "0.1.0"


def load_model(path, map_location="cpu") -> SEDModel:
    """The model of a checkpoint, rebuilt from the checkpoint's own config, in eval mode."""
    return load_checkpoint(path, map_location).model


def load_detector(path, map_location="cpu") -> Detector:
    """Front end, normalisation and model of a checkpoint, ready for audio (eval mode)."""
    ckpt = load_checkpoint(path, map_location)
    return Detector(ckpt.config, ckpt.model).to(map_location).eval()


__all__ = [
    "AudioStream", "Checkpoint", "CheckpointError", "ConfigError", "DecoderConfig", "Detector",
    "DetectorConfig", "FrontendConfig", "ModelConfig", "ModelStream", "NormalizationStats",
    "SEDModel", "StepOutput", "TUT_SED_2016_LABELS", "build_model", "count_parameters",
    "load_checkpoint", "load_detector", "load_model", "macs_per_frame", "register_temporal", "save_checkpoint",
]
