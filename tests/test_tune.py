"""Threshold tuning: the grid search finds the per-class (on, off) that the decoder scores best."""

from types import SimpleNamespace

import numpy as np

from rtsed.config import DecoderConfig
from train.tune import decoded_frames, f1, tune_thresholds


def test_tuning_finds_each_class_operating_point():
    rng = np.random.default_rng(0)
    t = 3000
    targets = np.zeros((t, 2), np.float32)
    for start in range(100, t, 400):
        targets[start:start + 150] = 1.0
    probs = np.empty((t, 2), np.float32)
    # Class 0: active frames sit at 0.30-0.40, silence at 0.0-0.2: only thresholds <= 0.3 find them.
    probs[:, 0] = np.where(targets[:, 0] > 0, rng.uniform(0.30, 0.40, t), rng.uniform(0.0, 0.2, t))
    # Class 1: a confident class; active at 0.8-1.0, silence 0.5-0.7 (0.5 would fire everywhere).
    probs[:, 1] = np.where(targets[:, 1] > 0, rng.uniform(0.8, 1.0, t), rng.uniform(0.5, 0.7, t))
    outputs = [SimpleNamespace(probs=probs, targets=targets)]
    tuned, table = tune_thresholds(outputs, 0.02, DecoderConfig(), 2)
    assert 0.2 <= tuned.on_thresholds[0] <= 0.30
    assert 0.7 <= tuned.on_thresholds[1] <= 0.8
    assert all(off <= on for on, off in zip(tuned.on_thresholds, tuned.off_thresholds))
    assert table[0]["f1_tuned"] == 1.0 and table[0]["f1_at_0.5"] == 0.0
    assert table[1]["f1_tuned"] == 1.0 and table[1]["f1_at_0.5"] < 0.8


def test_decoded_frames_follow_the_decoder():
    probs = np.array([0.0, 0.9, 0.9, 0.45, 0.9, 0.0, 0.0], np.float32)
    hysteresis = DecoderConfig(on_thresholds=(0.8,), off_thresholds=(0.4,))
    assert decoded_frames(probs, 0.02, hysteresis).tolist() == [False, True, True, True, True, False, False]
    plain = DecoderConfig(on_thresholds=(0.8,), off_thresholds=(0.8,))
    assert decoded_frames(probs, 0.02, plain).tolist() == [False, True, True, False, True, False, False]
    assert f1(np.array([True, False]), np.array([True, True])) == 2 / 3
