"""Shared by the engine tests: a small real checkpoint whose events are plentiful."""

from __future__ import annotations

from pathlib import Path

import torch

import rtsed
from rtsed.config import DecoderConfig, DetectorConfig, FrontendConfig, ModelConfig, NormalizationStats


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
