"""Shared by the train.fit tests (test_fit, test_label_check, test_lr_schedule): tiny two-class
scenes of tone bursts ("beep") and noise bursts ("hiss") in train.synth's layout, and the options of a
tiny model that trains in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from procedural import write_dcase_split

RATE = 16000
LABELS = ["beep", "hiss"]
TINY = ["--model", "dnd_7_10", "--set", "model.channels=8"]


def beep_hiss_scene(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """Faint noise with three events: 880 Hz tone bursts ("beep") and noise bursts ("hiss")."""
    n = int(seconds * RATE)
    x = 0.003 * rng.standard_normal(n)
    events = []
    for k in range(3):
        label = LABELS[k % 2]
        onset = rng.uniform(0.0, seconds - 0.6)
        offset = onset + rng.uniform(0.2, 0.5)
        a, b = int(onset * RATE), int(offset * RATE)
        t = np.arange(b - a) / RATE
        x[a:b] += 0.3 * np.sin(2 * np.pi * 880 * t) if label == "beep" else 0.2 * rng.standard_normal(b - a)
        events.append((round(onset, 3), round(offset, 3), label))
    return x.astype(np.float32), events


def write_split(folder: Path, n_files: int, seconds: float, rng: np.random.Generator) -> tuple[Path, Path]:
    """n_files beep/hiss scenes of ``seconds`` in DCASE layout: (audio folder, annotations TSV)."""
    return write_dcase_split(folder, n_files, seconds, rng, beep_hiss_scene, RATE)


def make_scenes(root: Path, n_train: int = 4, n_val: int = 2, seconds: float = 3.0, seed: int = 0) -> Path:
    """A train.synth-like folder: <root>/{train,validate}/{audio/, annotations.tsv} + manifest.json."""
    rng = np.random.default_rng(seed)
    write_split(root / "train", n_train, seconds, rng)
    write_split(root / "validate", n_val, seconds, rng)
    (root / "manifest.json").write_text(json.dumps({"labels": LABELS}))
    return root
