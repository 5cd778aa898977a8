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
