"""Features for training: log-mel per file (cached on disk), frame targets, normalisation
statistics, and fixed-length training sequences.

The cache is keyed by the front-end config (a hash of its dict: any change of rate, window, hop,
bands, fmin/fmax or log offset lands in a fresh folder, so stale features are never read) and
by each file's resolved path, size and modification time (an edited file is recomputed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from rtsed.atomic import lock_temporary, os_error_reason, remove_stale_temporaries
from rtsed.audio.files import read_audio
from rtsed.config import FrontendConfig, NormalizationStats
from rtsed.audio.frontend import LogMel
from train.annotations import Event, events_to_frame_targets

SEQUENCE_FRAMES = 1024  # the paper's T


def config_digest(frontend: FrontendConfig) -> str:
    """A short stable hash of the front-end config (names the cache folder)."""
    blob = json.dumps(frontend.to_dict(), sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


# A cache entry's temporary file older than this, and not locked by a live writer, was left by a
# killed run (an entry takes well under a second to write).
STALE_TEMPORARY_S = 60.0


class FeatureCache:
    """Log-mel features of audio files, computed once and stored as .npy under
    ``root/<config digest>/``. ``get(path)`` -> (T, n_mels) float32.

    Opening the cache deletes the ``*.npy.tmp`` files that runs killed mid-write left behind;
    runs sharing the folder keep theirs (each writer locks its temporary file)."""

    def __init__(self, root: str | Path, frontend: FrontendConfig):
        self.frontend = frontend
        self.folder = Path(root) / config_digest(frontend)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.removed_temporaries = remove_stale_temporaries(self.folder, "*.npy.tmp", STALE_TEMPORARY_S)
        meta = self.folder / "frontend.json"
        if not meta.exists():
            meta.write_text(json.dumps(frontend.to_dict(), indent=1, sort_keys=True))
        self._logmel = LogMel(frontend)
        self.hits = 0
        self.misses = 0

    def _entry(self, path: Path) -> Path:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        return self.folder / (hashlib.sha1(key.encode()).hexdigest()[:24] + ".npy")

    def get(self, path: str | Path) -> np.ndarray:
        path = Path(path)
        entry = self._entry(path)
        if entry.exists():
            try:
                feats = np.load(entry)  # empty file: EOFError; garbage or truncated: ValueError
                ok = feats.dtype == np.float32 and feats.ndim == 2 and feats.shape[1] == self.frontend.n_mels
            except Exception:
                ok = False
            if ok:
                self.hits += 1
                return feats
            entry.unlink(missing_ok=True)  # a damaged cache entry is recomputed, not trusted
        samples = read_audio(path, self.frontend.sample_rate_hz)
        with torch.no_grad():
            feats = self._logmel(torch.from_numpy(samples)).numpy()
        self.misses += 1
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".npy.tmp")
        lock_temporary(fd)  # held until the file is closed: another run's cleanup skips it
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, feats)
            os.replace(tmp, entry)  # atomic: parallel workers or a killed run never leave half a file
        except OSError as exc:  # a full disk: the features are still good for this run
            Path(tmp).unlink(missing_ok=True)
            # np.save reports a short write without an errno ("N requested and M written").
            full = exc.errno is None and shutil.disk_usage(self.folder).free < feats.nbytes
            reason = ("the disk is full: free some space or give --cache-dir on another disk" if full
                      else os_error_reason(exc))
            warnings.warn(f"feature cache {self.folder}: {path.name} not cached: {reason}", RuntimeWarning,
                          stacklevel=2)
        return feats


@dataclass
class FileFeatures:
    """One annotated file: features (T, F), targets (T, C) in {0, 1}."""

    path: Path
    features: np.ndarray
    targets: np.ndarray


def load_split(pairs: Sequence[tuple[Path, Sequence[Event]]], cache: FeatureCache,
               labels: Sequence[str]) -> list[FileFeatures]:
    """Features and frame targets of every (audio_path, events) pair of a split."""
    hop_s = cache.frontend.hop_s
    out = []
    for path, events in pairs:
        feats = cache.get(path)
        targets = events_to_frame_targets(events, feats.shape[0], hop_s, labels)
        out.append(FileFeatures(Path(path), feats, targets))
    return out


def normalization_stats(files: Sequence[FileFeatures]) -> NormalizationStats:
    """Per-band mean and standard deviation over every frame of the (training) files."""
    count = sum(f.features.shape[0] for f in files)
    if count == 0:
        raise ValueError("normalization_stats: no frames in the training split")
    total = sum(f.features.astype(np.float64).sum(axis=0) for f in files)
    mean = total / count
    sq = sum(((f.features.astype(np.float64) - mean) ** 2).sum(axis=0) for f in files)
    std = np.sqrt(sq / count)
    std = np.maximum(std, 1e-5)  # a constant band (e.g. above a low-pass) must not divide by zero
    return NormalizationStats(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


class SequenceDataset(Dataset):
    """Fixed-length training sequences cut from files, normalised.

    Each file is cut into consecutive sequences of ``sequence_frames``; the last, shorter piece
    is zero-padded and its padding masked out of the loss (so no frame of data is dropped and
    none is invented). Item: x (T, F) float32, y (T, C) float32, mask (T,) float32.
    """

    def __init__(self, files: Sequence[FileFeatures], norm: NormalizationStats,
                 sequence_frames: int = SEQUENCE_FRAMES):
        mean = np.asarray(norm.mean, dtype=np.float32)
        std = np.asarray(norm.std, dtype=np.float32)
        self.sequence_frames = sequence_frames
        self.items: list[tuple[np.ndarray, np.ndarray, int]] = []
        for f in files:
            x = (f.features - mean) / std
            for start in range(0, x.shape[0], sequence_frames):
                seg_x, seg_y = x[start:start + sequence_frames], f.targets[start:start + sequence_frames]
                self.items.append((seg_x, seg_y, seg_x.shape[0]))
        if not self.items:
            raise ValueError("SequenceDataset: no frames at all (every file shorter than one window?)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seg_x, seg_y, n = self.items[i]
        t = self.sequence_frames
        x = torch.zeros(t, seg_x.shape[1])
        y = torch.zeros(t, seg_y.shape[1])
        mask = torch.zeros(t)
        x[:n] = torch.from_numpy(seg_x)
        y[:n] = torch.from_numpy(seg_y)
        mask[:n] = 1.0
        return x, y, mask
