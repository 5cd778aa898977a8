"""A detector: front end + normalisation + model, offline on whole signals or streaming on audio.

    samples (N,) at config.frontend.sample_rate_hz -> log-mel (T, F) -> (x - mean) / std
    -> SEDModel -> logits (T, C)

Both paths run the same modules; ``AudioStream`` is the streaming one (any chunk size in,
the frames completed so far out) and equals the offline path within the parity rule of docs/streaming.md.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from rtsed.config import DetectorConfig, NormalizationStats
from rtsed.audio.frontend import LogMel, LogMelStream
from rtsed.models.model import SEDModel
from rtsed.serve.steppers import TorchStepper
from rtsed.stream.model_stream import ModelStream


class Detector(nn.Module):
    """Front end, normalisation and model under one config (what a checkpoint holds)."""

    def __init__(self, config: DetectorConfig, model: SEDModel | None = None):
        super().__init__()
        self.config = config
        self.frontend = LogMel(config.frontend)
        self.model = model if model is not None else SEDModel(config.model)
        if self.model.config != config.model:
            raise ValueError(f"model {self.model.name} does not match config.model {config.model.name}")
        norm = config.normalization or NormalizationStats.identity(config.model.n_mels)
        # Non-persistent: the statistics live in the config, the single source of truth.
        self.register_buffer("norm_mean", torch.tensor(norm.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("norm_std", torch.tensor(norm.std, dtype=torch.float32), persistent=False)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.config.labels

    @property
    def hop_s(self) -> float:
        return self.config.frontend.hop_s

    @property
    def lookahead_frames(self) -> int:
        return self.model.lookahead_frames

    @property
    def lookahead_s(self) -> float:
        return self.lookahead_frames * self.hop_s

    @property
    def algorithmic_latency_s(self) -> float:
        """Window + lookahead: how long after a sound the last sample its frame needs arrives
        (0.76 s for dnd_7_10 at 40 ms / 20 ms, 40 ms for a causal model); resampling adds its delay."""
        return self.config.frontend.window_s + self.lookahead_s

    def normalize(self, logmel: Tensor) -> Tensor:
        """(..., T, F) log-mel -> (..., T, F) z-scored with the training statistics."""
        return (logmel - self.norm_mean) / self.norm_std

    def features(self, samples: Tensor) -> Tensor:
        """(..., N) samples -> (..., T, F) normalised log-mel."""
        return self.normalize(self.frontend(samples))

    def forward(self, samples: Tensor) -> Tensor:
        """samples: (B, N) mono float at the front end's rate -> logits (B, T, C)."""
        return self.model(self.features(samples))

    @torch.no_grad()
    def detect_logits(self, samples: np.ndarray | Tensor) -> Tensor:
        """One signal (N,) -> logits (T, C), offline (eval mode)."""
        x = torch.as_tensor(samples, dtype=torch.float32, device=self.norm_mean.device)
        return self.eval()(x[None])[0]

    def stepper(self, batch_size: int = 1, max_step_frames: int = 64, precision: str = "fp32") -> TorchStepper:
        """This detector's model behind the ``Stepper`` protocol, for ``DetectionEngine`` and
        ``MultiStreamEngine`` (puts the model in eval mode)."""
        return TorchStepper(self.model, self.config, batch_size, str(self.norm_mean.device), max_step_frames,
                            precision)

    def stream(self, max_step_frames: int = 64) -> "AudioStream":
        """A streaming session over this detector (puts it in eval mode)."""
        return AudioStream(self.eval(), max_step_frames)


class AudioStream:
    """One audio stream through a Detector: push samples in any chunking, get logits of the
    frames completed so far; ``flush`` at the end completes the stream as offline padding does."""

    def __init__(self, detector: Detector, max_step_frames: int = 64):
        self.detector = detector
        self.logmel = LogMelStream(detector.config.frontend, device=detector.norm_mean.device)
        self.model_stream = ModelStream(detector.model, batch_size=1, max_step_frames=max_step_frames)

    @property
    def lookahead_frames(self) -> int:
        return self.model_stream.lookahead_frames

    def push(self, samples: np.ndarray | Tensor) -> Tensor:
        """samples (n,) mono float -> logits (m, C) of newly completed output frames."""
        frames = self.logmel.push(samples)
        if frames.shape[0] == 0:
            return torch.zeros(0, len(self.detector.labels), device=frames.device)
        with torch.no_grad():
            return self.model_stream.push(self.detector.normalize(frames))

    def flush(self) -> Tensor:
        """End the stream: the last lookahead frames' logits (the partial last audio frame is
        dropped, as offline). ``reset`` before reusing."""
        return self.model_stream.flush()

    def reset(self) -> None:
        self.logmel.reset()
        self.model_stream.reset()
