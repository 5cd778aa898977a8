"""False alarms per minute: the events a detector reports on audio in which none of its target
classes sounds.

    python -m train.evaluate --model dnd_7_10.pt --false-alarms recordings/speech_music_city/

Every audio file under the folder runs, whole, through the checkpoint's detector and its decoder
(the events ``rtsed.detect`` reports: streaming equals offline, tested). A file's *category* says
what sounds in it: the ``category`` column of a ``meta.csv`` in the folder (``filename`` relative to
it), else the name of the file's first sub-folder (``speech/``, ``music/``, ``ambience/``...), else
``unknown``. An event is right, not false, only where its label is the file's category (a
``speech`` event on a speech file, a ``music`` event on a music file); every other event is a false
alarm. The rate is false alarms divided by the audio's minutes, overall, per category and per
reported label.
"""

from __future__ import annotations

import csv
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtsed.audio.files import AUDIO_SUFFIXES, audio_files_under  # the files rtsed.detect reads
from rtsed.models.checkpoint import Checkpoint
from rtsed.serve.decode import decode_offline
from rtsed.serve.detector import Detector
from train.inference import InMemoryFeatures, file_logits


class FalseAlarmError(ValueError):
    """A folder that cannot be scored for false alarms; the message names it and the fix."""


def categorised_audio(folder: str | Path) -> list[tuple[Path, str]]:
    """(audio file, category) for every audio file under ``folder``, sorted by path."""
    root = Path(folder)
    if not root.is_dir():
        raise FalseAlarmError(f"--false-alarms {root}: no such folder; give a folder of audio files")
    files = audio_files_under(root)
    if not files:
        raise FalseAlarmError(f"--false-alarms {root}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) under it")
    categories: dict[Path, str] = {}
    meta = root / "meta.csv"
    if meta.is_file():
        with meta.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("filename") and row.get("category"):
                    categories[(root / row["filename"]).resolve()] = row["category"].strip()
    out = []
    for path in files:
        category = categories.get(path.resolve())
        if category is None:
            parts = path.relative_to(root).parts
            category = parts[0] if len(parts) > 1 else "unknown"
        out.append((path, category))
    return out


@torch.no_grad()
def false_alarms(checkpoint: Checkpoint, folder: str | Path, device: str | torch.device = "cpu",
                 logits: Callable[[Path, np.ndarray], torch.Tensor] | None = None) -> dict[str, Any]:
    """Score ``folder`` (see the module docstring); returns a JSON-ready dict with the rate per
    minute overall, per category and per label, and the counts behind them.

    ``logits``: (file, un-normalised log-mel (T, F)) -> logits (T, C) in place of the checkpoint's
    own forward, for callers that compute several detectors' outputs in one pass (detectors that
    share a frozen trunk, e.g. train.teach's); the checkpoint's labels and decoder still apply."""
    started = time.perf_counter()
    config = checkpoint.config
    labels = list(config.labels)
    hop_s = config.frontend.hop_s
    minutes: Counter[str] = Counter()
    false_by_category: Counter[str] = Counter()
    false_by_label: Counter[str] = Counter()
    right_by_label: Counter[str] = Counter()
    files_by_category: Counter[str] = Counter()
    worst: list[tuple[int, str]] = []
    for path, category, n_frames, probs in _file_probabilities(checkpoint, folder, device, logits):
        files_by_category[category] += 1
        minutes[category] += n_frames * hop_s / 60.0
        if probs is None:
            continue
        events = decode_offline(probs, labels, hop_s, config.decoder)
        n_false = 0
        for e in events:
            if e.label == category:
                right_by_label[e.label] += 1
            else:
                n_false += 1
                false_by_label[e.label] += 1
        false_by_category[category] += n_false
        worst.append((n_false, str(path.relative_to(folder))))
    total_min = sum(minutes.values())
    total_false = sum(false_by_category.values())
    worst.sort(key=lambda item: (-item[0], item[1]))
    return {
        "folder": str(folder),
        "minutes": total_min,
        "files": sum(files_by_category.values()),
        "false_alarms": total_false,
        "per_minute": total_false / total_min if total_min else float("nan"),
        "per_category": {
            c: {"files": files_by_category[c], "minutes": minutes[c], "false_alarms": false_by_category[c],
                "per_minute": false_by_category[c] / minutes[c] if minutes[c] else float("nan")}
            for c in sorted(minutes)
        },
        "per_label": {label: {"false_alarms": false_by_label[label], "per_minute":
                              false_by_label[label] / total_min if total_min else float("nan"),
                              "right": right_by_label[label]} for label in labels},
        "worst_files": [{"file": f, "false_alarms": n} for n, f in worst[:10] if n],
        "rule": "an event is right only where its label is the file's category; every other event is a false alarm",
        "seconds": time.perf_counter() - started,
    }


def false_alarm_probabilities(checkpoint: Checkpoint, folder: str | Path,
                              device: str | torch.device = "cpu") -> tuple[list[np.ndarray], list[str], float]:
    """What ``false_alarms`` decodes, before decoding: per audio file of ``folder`` its frame
    probabilities (T, C) and category, and the folder's minutes (for train.tune, which decodes
    them under thousands of candidate decoders)."""
    probs, categories, frames = [], [], 0
    for _, category, n_frames, p in _file_probabilities(checkpoint, folder, device):
        frames += n_frames
        if p is not None:
            probs.append(p)
            categories.append(category)
    return probs, categories, frames * checkpoint.config.frontend.hop_s / 60.0


@torch.no_grad()
def _file_probabilities(checkpoint: Checkpoint, folder: str | Path, device: str | torch.device = "cpu",
                        logits: Callable[[Path, np.ndarray], torch.Tensor] | None = None):
    """Per audio file of ``folder``, one at a time: (path, category, frames, probabilities (T, C),
    or None for a file shorter than one window). ``logits`` as in ``false_alarms``."""
    config = checkpoint.config
    detector = Detector(config, checkpoint.model).to(device).eval()
    features = InMemoryFeatures(config.frontend)
    for path, category in categorised_audio(folder):
        feats = features.get(path)
        if feats.shape[0] == 0:
            yield path, category, 0, None
            continue
        out = file_logits(detector, feats) if logits is None else logits(path, feats)
        yield path, category, feats.shape[0], torch.sigmoid(out.float()).cpu().numpy()


def format_false_alarms(result: dict[str, Any]) -> str:
    """The false-alarm result as a short text table."""
    lines = [
        f"False alarms on {result['folder']}: {result['false_alarms']} events in {result['minutes']:.1f} min "
        f"of {result['files']} files = {result['per_minute']:.2f} per minute",
        f"  ({result['rule']})",
        f"  {'category':<14} {'files':>6} {'minutes':>8} {'false':>6} {'per min':>8}",
    ]
    for c, row in result["per_category"].items():
        lines.append(f"  {c:<14} {row['files']:>6} {row['minutes']:>8.1f} {row['false_alarms']:>6} "
                     f"{row['per_minute']:>8.2f}")
    reported = {k: v for k, v in result["per_label"].items() if v["false_alarms"] or v["right"]}
    if reported:
        lines.append(f"  {'label':<18} {'false':>6} {'per min':>8} {'right':>6}")
        for label, row in reported.items():
            lines.append(f"  {label:<18} {row['false_alarms']:>6} {row['per_minute']:>8.2f} {row['right']:>6}")
    return "\n".join(lines)
