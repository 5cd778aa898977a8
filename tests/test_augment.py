"""Each augmentation of train.augment: the same generator seed gives the same output, a different
seed a different one, and labels (the audible extent the mixer computes from the augmented audio)
stay where the audio's energy is. Procedural audio only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from train.augment import AugmentConfig, WaveAugmenter, mixup, room_bank, spec_augment
from train.mixing import audible_segments
from procedural import tone  # tests/ is on sys.path (not a package)

RATE = 16000
OFF = dict(pitch_p=0.0, stretch_p=0.0, reverb_p=0.0, eq_p=0.0, bandpass_p=0.0, noise_p=0.0)
LEAD_S, TONE_S = 0.5, 0.6


def _clip() -> np.ndarray:
    return tone(RATE, TONE_S, 1000.0, lead_s=LEAD_S, tail_s=0.5)


def _augmenter(**on) -> WaveAugmenter:
    return WaveAugmenter(AugmentConfig(**{**OFF, **on}, rooms=4), RATE)


def _labels_follow_energy(x: np.ndarray) -> list[tuple[int, int]]:
    """The mixer's labels of x, checked against x's energy: every 20 ms frame within 20 dB of the
    loudest lies inside a label, and no label runs over more than 60 ms of frames 40 dB down."""
    segments = audible_segments(x, RATE, 30.0, 1.0)
    assert segments
    frame = RATE // 50
    n = len(x) // frame
    rms = np.sqrt((x[: n * frame].reshape(n, frame) ** 2).mean(axis=1))
    labelled = np.zeros(n, bool)
    for a, b in segments:
        labelled[a // frame: -(-b // frame)] = True
    loud = rms >= rms.max() * 10 ** (-20 / 20)
    assert not np.any(loud & ~labelled), "audible frames left unlabelled"
    quiet_labelled = labelled & (rms < rms.max() * 10 ** (-40 / 20))
    assert quiet_labelled.sum() <= 3, "labels over silence"
    return segments


def _same_and_different(fn) -> None:
    a = fn(np.random.default_rng(7))
    b = fn(np.random.default_rng(7))
    c = fn(np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert len(a) != len(c) or not np.array_equal(a, c)


@pytest.mark.parametrize("name", ["pitch", "stretch", "reverb"])
def test_event_augmentation_is_seeded_and_labels_follow(name):
    aug = _augmenter(**{f"{name}_p": 1.0})
    x = _clip()
    _same_and_different(lambda rng: aug.event(x, rng))
    y = aug.event(x, np.random.default_rng(3))
    assert not np.allclose(y[: len(x)] if len(y) >= len(x) else y, (x[: len(y)] if len(y) < len(x) else x))
    [(a, b)] = _labels_follow_energy(y)
    if name == "pitch":  # same length, same place
        assert len(y) == len(x)
        assert abs(a / RATE - LEAD_S) <= 0.04 and abs((b - a) / RATE - TONE_S) <= 0.06
    elif name == "stretch":  # the clip and its event get longer or shorter by the drawn rate
        rate = len(x) / len(y)
        assert 0.84 <= rate <= 1.21
        assert (b - a) / RATE == pytest.approx(TONE_S / rate, abs=0.06)
        assert a / RATE == pytest.approx(LEAD_S / rate, abs=0.06)
    else:  # reverberation starts with the dry sound and rings on after it
        assert abs(a / RATE - LEAD_S) <= 0.03
        assert b / RATE >= LEAD_S + TONE_S - 0.02


def test_event_augmentation_off_changes_nothing():
    x = _clip()
    assert np.array_equal(_augmenter().event(x, np.random.default_rng(0)), x)


@pytest.mark.parametrize("name", ["eq", "bandpass", "noise"])
def test_scene_augmentation_keeps_time_and_is_seeded(name):
    aug = _augmenter(**{f"{name}_p": 1.0})
    rng = np.random.default_rng(0)
    x = 0.01 * rng.standard_normal(RATE) + np.concatenate([np.zeros(RATE // 2), tone(RATE, 0.5, 1000.0, 0.3)])
    _same_and_different(lambda rng: aug.scene(x, rng))
    y = aug.scene(x, np.random.default_rng(1))
    assert y.shape == x.shape and not np.allclose(x, y)
    # time-preserving: the loud half stays the loud half
    assert np.sqrt(np.mean(y[RATE // 2:] ** 2)) > np.sqrt(np.mean(y[: RATE // 2] ** 2))


def test_room_bank_is_reproducible_and_starts_at_the_direct_path():
    a, b = room_bank(3, (0.2, 0.6), RATE, seed=1), room_bank(3, (0.2, 0.6), RATE, seed=1)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    for rir in a:
        assert np.argmax(np.abs(rir)) == round(0.002 * RATE) and np.max(np.abs(rir)) == 1.0
        assert len(rir) > 0.1 * RATE  # a tail, not a click


def test_spec_augment_masks_and_labels():
    cfg = AugmentConfig(freq_masks=2, freq_mask_bands=8, time_masks=2, time_mask_frames=30)
    x = np.random.default_rng(0).standard_normal((200, 40)).astype(np.float32)
    mask = np.ones(200, np.float32)
    a = spec_augment(x, mask, np.random.default_rng(5), cfg)
    b = spec_augment(x, mask, np.random.default_rng(5), cfg)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    xa, ma = a
    assert np.array_equal(x, np.random.default_rng(0).standard_normal((200, 40)).astype(np.float32))  # input kept
    zero_rows = np.all(xa == 0, axis=1)
    assert np.array_equal(zero_rows, ma == 0)  # time-masked frames, and only they, leave the loss
    zero_cols = np.all(xa == 0, axis=0)
    assert 0 < zero_cols.sum() <= 16  # frequency masks: labels stay (the mask does not move)
    off = dataclasses.replace(cfg, freq_masks=0, time_masks=0)
    xo, mo = spec_augment(x, mask, np.random.default_rng(5), off)
    assert np.array_equal(xo, x) and np.array_equal(mo, mask)


def test_mixup_is_seeded_and_mixes_targets_with_features():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 10, 3, generator=g), (torch.rand(4, 10, 2, generator=g) > 0.5).float()
    mask = torch.ones(4, 10)
    mask[0, 8:] = 0
    a = mixup(x, y, mask, np.random.default_rng(1), 1.0, 0.3)
    b = mixup(x, y, mask, np.random.default_rng(1), 1.0, 0.3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    mx, my, mm = a
    assert not torch.equal(mx, x) and torch.all((my >= 0) & (my <= 1))
    assert float(mm[0, 8:].sum()) == 0.0
    same = mixup(x, y, mask, np.random.default_rng(1), 0.0, 0.3)
    assert same[0] is x and same[1] is y and same[2] is mask
