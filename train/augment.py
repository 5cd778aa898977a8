"""Augmentation from kept libraries: audiomentations on the waveform, pyroomacoustics rooms,
SpecAugment-style masks and mixup on features.

Waveform (:class:`WaveAugmenter`, called by train.mixing for every event and utterance before it is
placed, and on the whole mix):

- per event: ``PitchShift`` and ``TimeStretch`` (audiomentations, signalsmith; the stretch changes
  the clip's length) and reverberation: the clip convolved with a room impulse response from a
  bank of simulated shoe-box rooms (pyroomacoustics, image source method, RT60 drawn from
  ``rt60_s``; each response starts at its direct path, so the sound does not move late). The
  mixer labels the augmented clip from its own audio, so labels follow every time change;
- on the whole mix (time-preserving): ``SevenBandParametricEQ`` (microphone colouration),
  ``BandPassFilter`` (a small device's band), ``AddColorNoise`` (self-noise of a cheap input).

audiomentations draws its parameters from Python's ``random`` and numpy's global generator; each
call seeds both from the scene's generator first, so a scene stays a pure function of its seed.

Features (:func:`spec_augment`, :func:`mixup`): frequency masks (labels unaffected), time masks
whose frames leave the loss (their mask is 0: a masked frame is neither "silence" nor its old
label), and mixup of two sequences of a batch (features and targets mixed with one weight).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.signal import fftconvolve


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """Probabilities (``*_p``) and ranges of each augmentation; a probability of 0 turns one off."""

    pitch_p: float = 0.3
    pitch_semitones: tuple[float, float] = (-2.0, 2.0)
    stretch_p: float = 0.3
    stretch_rate: tuple[float, float] = (0.85, 1.2)
    reverb_p: float = 0.4
    rt60_s: tuple[float, float] = (0.15, 0.8)
    rooms: int = 32  # simulated rooms in the bank
    eq_p: float = 0.3
    eq_db: float = 6.0
    bandpass_p: float = 0.15
    noise_p: float = 0.3
    noise_snr_db: tuple[float, float] = (20.0, 45.0)
    # Features, per training sequence / per batch.
    freq_masks: int = 2
    freq_mask_bands: int = 6
    time_masks: int = 2
    time_mask_frames: int = 20
    mixup_p: float = 0.0
    mixup_alpha: float = 0.3

    def __post_init__(self) -> None:
        for name in ("pitch_semitones", "stretch_rate", "rt60_s", "noise_snr_db"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        probs = (self.pitch_p, self.stretch_p, self.reverb_p, self.eq_p, self.bandpass_p, self.noise_p, self.mixup_p)
        if not all(0 <= p <= 1 for p in probs):
            raise ValueError("AugmentConfig: probabilities must be in [0, 1]")
        if min(self.freq_masks, self.freq_mask_bands, self.time_masks, self.time_mask_frames) < 0 or self.rooms < 1:
            raise ValueError("AugmentConfig: mask counts and sizes must be >= 0, rooms >= 1")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AugmentConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"AugmentConfig: unknown field(s) {unknown}")
        return cls(**d)


def room_bank(n_rooms: int, rt60_s: tuple[float, float], sample_rate_hz: int, seed: int = 0) -> list[np.ndarray]:
    """Impulse responses of ``n_rooms`` shoe-box rooms (3-10 x 3-8 x 2.4-4 m, RT60 drawn from
    ``rt60_s``, source and microphone at random places at least 0.5 m from the walls), each
    trimmed to start 2 ms before its direct path and scaled to a direct-path peak of 1."""
    import pyroomacoustics as pra

    rng = np.random.default_rng([seed, n_rooms])
    bank = []
    while len(bank) < n_rooms:
        dims = rng.uniform([3.0, 3.0, 2.4], [10.0, 8.0, 4.0])
        rt60 = rng.uniform(*rt60_s)
        source, mic = rng.uniform(0.5, dims - 0.5), rng.uniform(0.5, dims - 0.5)
        try:
            absorption, max_order = pra.inverse_sabine(rt60, dims)
        except ValueError:  # an RT60 this room cannot have (too short for its size)
            continue
        room = pra.ShoeBox(dims, fs=sample_rate_hz, materials=pra.Material(absorption),
                           max_order=min(int(max_order), 40))
        room.add_source(source)
        room.add_microphone(mic)
        room.compute_rir()
        rir = np.asarray(room.rir[0][0], dtype=np.float64)
        direct = int(np.argmax(np.abs(rir)))
        rir = rir[max(0, direct - round(0.002 * sample_rate_hz)):]
        bank.append(rir / np.max(np.abs(rir)))
    return bank


def _seed_globals(rng: np.random.Generator) -> None:
    """audiomentations draws from the global generators: seed both from the scene's."""
    seed = int(rng.integers(2**32))
    random.seed(seed)
    np.random.seed(seed)


class WaveAugmenter:
    """Per-event and whole-mix waveform augmentation (module docstring); every draw comes from the
    ``rng`` passed in. Build it once per process (the room bank is simulated here)."""

    def __init__(self, cfg: AugmentConfig, sample_rate_hz: int):
        import audiomentations as am

        self.cfg, self.rate = cfg, sample_rate_hz
        self.rooms = room_bank(cfg.rooms, cfg.rt60_s, sample_rate_hz) if cfg.reverb_p > 0 else []
        self._pitch = am.PitchShift(*cfg.pitch_semitones, p=1.0)
        self._stretch = am.TimeStretch(*cfg.stretch_rate, leave_length_unchanged=False, p=1.0)
        self._eq = am.SevenBandParametricEQ(-cfg.eq_db, cfg.eq_db, p=1.0)
        self._bandpass = am.BandPassFilter(min_center_freq=500.0, max_center_freq=2000.0,
                                           min_bandwidth_fraction=1.0, max_bandwidth_fraction=1.9, p=1.0)
        self._noise = am.AddColorNoise(*cfg.noise_snr_db, p=1.0)

    def _apply(self, transform, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _seed_globals(rng)
        return transform(x.astype(np.float32), self.rate).astype(np.float64)

    def event(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One clip (n,) -> augmented clip (m,): pitch, time stretch, reverberation, each drawn."""
        cfg = self.cfg
        draws = rng.random(3)
        if draws[0] < cfg.pitch_p:
            x = self._apply(self._pitch, x, rng)
        if draws[1] < cfg.stretch_p:
            x = self._apply(self._stretch, x, rng)
        if draws[2] < cfg.reverb_p and self.rooms:
            rir = self.rooms[int(rng.integers(len(self.rooms)))]
            wet = fftconvolve(x, rir)
            # The tail rings past the clip; keep it (it is sound) but not past -60 dB of RT60 tail.
            x = wet[: len(x) + len(rir) // 2]
        return x

    def scene(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The whole mix (n,) -> (n,): microphone colouration, band limits, added noise, each drawn."""
        cfg = self.cfg
        if not np.any(x):
            return x
        draws = rng.random(3)
        if draws[0] < cfg.eq_p:
            x = self._apply(self._eq, x, rng)
        if draws[1] < cfg.bandpass_p:
            x = self._apply(self._bandpass, x, rng)
        if draws[2] < cfg.noise_p:
            x = self._apply(self._noise, x, rng)
        return x


def spec_augment(x: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """SpecAugment on one normalised sequence x: (T, F) with loss mask (T,): frequency bands set to 0
    (the normalised mean; labels unaffected: the event still sounds in the other bands), and time
    spans set to 0 whose frames leave the loss. Returns new arrays."""
    x, mask = x.copy(), mask.copy()
    t, f = x.shape
    for _ in range(cfg.freq_masks):
        width = int(rng.integers(0, cfg.freq_mask_bands + 1))
        start = int(rng.integers(0, max(f - width, 0) + 1))
        x[:, start:start + width] = 0.0
    for _ in range(cfg.time_masks):
        width = int(rng.integers(0, cfg.time_mask_frames + 1))
        start = int(rng.integers(0, max(t - width, 0) + 1))
        x[start:start + width] = 0.0
        mask[start:start + width] = 0.0
    return x, mask


def mixup(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator,
          p: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """With probability p, the batch mixed with a shuffled copy of itself: x = l x + (1 - l) x',
    y = l y + (1 - l) y' (soft targets), with l ~ Beta(alpha, alpha) per sequence; a frame counts
    in the loss only where both sources are real. x: (B, T, F), y: (B, T, C), mask: (B, T)."""
    if p <= 0 or rng.random() >= p:
        return x, y, mask
    b = x.shape[0]
    perm = torch.from_numpy(rng.permutation(b))
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=b)).to(x.dtype).view(b, 1, 1)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm], mask * mask[perm]
