"""Whole-file inference for evaluation: log-mel features and one offline forward per file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rtsed.audio.files import read_audio
from rtsed.config import FrontendConfig
from rtsed.serve.detector import Detector
from rtsed.audio.frontend import LogMel


class InMemoryFeatures:
    """FeatureCache's ``get`` without the disk: (T, F) log-mel of a file, computed on the CPU."""

    def __init__(self, frontend: FrontendConfig):
        self.frontend = frontend
        self._logmel = LogMel(frontend)

    @torch.no_grad()
    def get(self, path: Path) -> np.ndarray:
        samples = read_audio(path, self.frontend.sample_rate_hz)
        return self._logmel(torch.from_numpy(samples)).numpy()


@torch.no_grad()
def file_logits(detector: Detector, features: np.ndarray) -> torch.Tensor:
    """(T, F) un-normalised log-mel -> (T, C) logits: normalisation and one model forward over the
    whole sequence (offline, eval mode) on the detector's device."""
    device = detector.norm_mean.device
    x = detector.normalize(torch.from_numpy(np.ascontiguousarray(features)).to(device))
    return detector.model.eval()(x[None])[0]


def onnx_logits(path: str | Path, frames_per_step: int = 16):
    """An exported graph as a (T, F) un-normalised log-mel -> (T, C) logits function: an offline
    graph in one run; a step graph streamed as a user runs it (one stream, ``frames_per_step``
    frames per step, then flushed), so that what is scored is what rtsed.live computes."""
    from rtsed.stream.onnx_runtime import OnnxFile, OnnxOffline, OnnxStream

    if OnnxFile.open(path).graph == "offline":
        graph = OnnxOffline(path)
        return lambda features: graph.logits(features[None])[0]

    def streamed(features: np.ndarray) -> np.ndarray:
        stream = OnnxStream(path)
        parts = [stream.push(features[i:i + frames_per_step]) for i in range(0, len(features), frames_per_step)]
        return np.concatenate([*parts, stream.flush()])

    return streamed
