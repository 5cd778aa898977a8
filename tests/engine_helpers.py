"""Shared by the engine tests (test_engine, test_steppers, test_detect, ...): a small real checkpoint
whose events are plentiful (the ``checkpoint`` fixture in conftest.py builds it), a scene with a
tone and a noise burst, offline detection to compare streaming with, and event-list equality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import rtsed
from rtsed.config import DecoderConfig, DetectorConfig, FrontendConfig, ModelConfig, NormalizationStats
from rtsed.serve.decode import decode_offline

RATE = 16000  # Hz: the engine checkpoint's front end and the scenes'
LABELS = ("tone", "noise", "click")  # the engine checkpoint's classes


def lively_checkpoint(path: Path, model_name: str, labels: tuple[str, str, str], seed: int, rate: int = 16000) -> Path:
    """A small ``model_name`` model (16 channels, 3 classes) with randomised BN statistics and its
    classifier scaled so that its probabilities cross the thresholds often (events to compare),
    saved as a real checkpoint at ``path``; ``seed`` fixes the weights."""
    torch.manual_seed(seed)
    config = DetectorConfig(
        frontend=FrontendConfig.for_rate(rate),
        model=ModelConfig.from_name(model_name, n_classes=3, channels=16),
        labels=labels,
        normalization=NormalizationStats(mean=(-6.0,) * 40, std=(3.0,) * 40),
        decoder=DecoderConfig(on_thresholds=(0.6, 0.55, 0.5), off_thresholds=(0.4, 0.45, 0.5), min_event_s=0.06),
    )
    model = rtsed.SEDModel(config.model).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
    return rtsed.save_checkpoint(path, model, config)


def scene(seconds=6.0, seed=0):
    """(seconds * RATE,) float32: faint noise, an 800 Hz tone at 1.0-2.5 s, a noise burst at 3.0-4.2 s."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    x = 0.01 * rng.standard_normal(t.shape)
    x += 0.3 * np.sin(2 * np.pi * 800 * t) * ((t > 1.0) & (t < 2.5))
    x += 0.2 * rng.standard_normal(t.shape) * ((t > 3.0) & (t < 4.2))
    return x.astype(np.float32)


def offline_events(checkpoint_path, audio):
    """Whole-file detection (probabilities of one forward, then the decoder): (events, probs (T, C))."""
    detector = rtsed.load_detector(checkpoint_path)
    probs = torch.sigmoid(detector.detect_logits(audio)).numpy()
    return decode_offline(probs, detector.labels, detector.hop_s, detector.config.decoder), probs


def same_events(a, b):
    """Two event lists equal up to order: labels, onsets and offsets to 1e-9 s, scores to 1e-4."""
    a = sorted(a, key=lambda e: (e.onset_s, e.label))
    b = sorted(b, key=lambda e: (e.onset_s, e.label))
    return len(a) == len(b) and all(x.label == y.label and abs(x.onset_s - y.onset_s) < 1e-9
                                    and abs(x.offset_s - y.offset_s) < 1e-9 and abs(x.score - y.score) < 1e-4
                                    for x, y in zip(a, b))
