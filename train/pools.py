"""Clip pools that scenes are mixed from: event pools (ESC-style, by fold), world pools (speech,
music, everyday sound, by group) and the stores that hold their decoded audio.

- **Event pools** (:func:`load_pool`): a folder with ``meta.csv`` (``filename`` relative to the
  folder, ``class``, and optionally ``fold``, ``source_clip_id``, ``clip_license``,
  ``freesound_author``, ``freesound_url``, ``source_dataset``), or one sub-folder per class.
  Without a fold, ESC-style names ``<fold>-<id>-<take>`` give it; otherwise a CRC32 of the
  recording id picks one.
- **World pools** (:func:`load_world`): folders with a ``meta.csv`` of ``filename, category
  [, split], source, group, duration_s, license, attribution`` (the training pool that
  ../shared/tools/negatives builds, ../shared/data/fsdd-train). Category is speech, music or
  ambience; rows whose ``split`` is not ``train`` are never read. :func:`split_world` holds whole
  groups (speakers, albums, packages) out for validation scenes, so validation never hears a
  voice or an album that training heard.
- **Stores**: :class:`ClipCache` decodes on first use (offline synthesis); :class:`MemoryStore`
  decodes everything up front into int16 (on-the-fly training: about 1.9 MB per minute of
  16 kHz audio, shared copy-on-write with forked DataLoader workers).
"""

from __future__ import annotations

import csv
import re
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from train.datasets import AUDIO_EXTENSIONS
from train.mixing import Clip, MixError, audible_segments, excerpt_start

_FREESOUND_ID = re.compile(r"/sounds/(\d+)")
_ESC_NAME = re.compile(r"^(\d+)-(\d+)-[A-Za-z]+$")
WORLD_CATEGORIES = ("speech", "music", "ambience")


def _recording_id(stem: str, url: str, source_clip_id: str, label: str) -> str:
    """Freesound sound id from the URL or an ESC-style name (<fold>-<sound id>-<take>), else per clip."""
    if m := _FREESOUND_ID.search(url):
        return f"freesound:{m[1]}"
    if m := _ESC_NAME.match(source_clip_id or stem):
        return f"freesound:{m[2]}"
    return f"{label}/{source_clip_id or stem}"


def load_pool(root: str | Path, n_hash_folds: int = 4) -> list[Clip]:
    """Clips of an event pool folder (meta.csv, or one sub-folder per class), sorted by filename."""
    root = Path(root)
    rows: list[dict[str, str]] = []
    if (root / "meta.csv").is_file():
        with open(root / "meta.csv", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"filename", "class"} - set(reader.fieldnames or ())
            if missing:
                raise MixError(f"{root / 'meta.csv'}: missing column(s) {sorted(missing)}")
            rows = list(reader)
    elif root.is_dir():
        rows = [{"filename": p.relative_to(root).as_posix(), "class": d.name}
                for d in sorted(root.iterdir()) if d.is_dir()
                for p in sorted(d.iterdir()) if p.suffix.lower() in AUDIO_EXTENSIONS]
    if not rows:
        raise MixError(f"{root}: no clips (expected meta.csv or one sub-folder of audio per class)")
    clips = []
    for row in rows:
        path, label = root / row["filename"], row["class"].strip()
        if not path.is_file():
            raise MixError(f"{root}: clip {row['filename']!r} listed but missing")
        stem, url, clip_id = path.stem, row.get("freesound_url", ""), row.get("source_clip_id", "")
        rec = _recording_id(stem, url, clip_id, label)
        if row.get("fold"):
            fold = int(row["fold"])
        elif m := _ESC_NAME.match(clip_id or stem):
            fold = int(m[1])
        else:  # stable across runs and machines, unlike hash()
            fold = zlib.crc32(rec.encode()) % n_hash_folds + 1
        clips.append(Clip(path, row["filename"], label, fold, rec, row.get("clip_license", "").strip(),
                          row.get("freesound_author", ""), url, row.get("source_dataset", "")))
    return sorted(clips, key=lambda c: c.filename)


def filter_licenses(clips: list[Clip], licenses: tuple[str, ...] | None) -> list[Clip]:
    """Clips whose licence is one of ``licenses`` (case-insensitive); None keeps all. A clip with
    no licence never passes a filter."""
    if licenses is None:
        return clips
    allowed = {x.strip().lower() for x in licenses}
    return [c for c in clips if c.license.lower() in allowed]


def load_world(roots: tuple[str, ...] | list[str]) -> list[Clip]:
    """Training clips (split ``train`` or no split column) of world pools, sorted by (root, filename).
    ``label`` is the category, ``recording_id`` is ``<source>/<group>`` (the unit of every split)."""
    clips = []
    for root in map(Path, roots):
        meta = root / "meta.csv"
        if not meta.is_file():
            raise MixError(f"{root}: world pool without meta.csv (filename, category, source, group, ...)")
        with open(meta, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"filename", "category", "group"} - set(reader.fieldnames or ())
            if missing:
                raise MixError(f"{meta}: missing column(s) {sorted(missing)}")
            rows = [r for r in reader if r.get("split", "train") in ("train", "")]
        for row in rows:
            category = row["category"].strip()
            if category not in WORLD_CATEGORIES:
                raise MixError(f"{meta}: {row['filename']}: category {category!r} is not one of {WORLD_CATEGORIES}")
            path = root / row["filename"]
            if not path.is_file():
                raise MixError(f"{root}: clip {row['filename']!r} listed but missing")
            group = f"{row.get('source', '').strip()}/{row['group'].strip()}"
            clips.append(Clip(path, row["filename"], category, 0, group, row.get("license", "").strip(),
                              row.get("attribution", ""), "", root.name))
    return clips


def split_world(clips: list[Clip], held_out_fraction: float = 0.2) -> tuple[list[Clip], list[Clip]]:
    """(training clips, held-out clips): per category, whole groups are held out, those with the
    lowest CRC32 of their name, ceil(fraction x groups) of them, but never a category's only group.
    A pure function of the group names: train.synth's validation scenes and train.fit's on-the-fly
    scenes agree on it without sharing a file."""
    held: set[str] = set()
    for category in WORLD_CATEGORIES:
        groups = sorted({c.recording_id for c in clips if c.label == category},
                        key=lambda g: (zlib.crc32(g.encode()), g))
        if len(groups) >= 2 and held_out_fraction > 0:
            k = min(len(groups) - 1, int(np.ceil(held_out_fraction * len(groups))))
            held |= set(groups[:k])
    return [c for c in clips if c.recording_id not in held], [c for c in clips if c.recording_id in held]


def subset_by_minutes(clips: list[Clip], minutes: float | None, rng: np.random.Generator) -> list[Clip]:
    """A random subset of each category's clips, at most ``minutes`` of audio per category (file
    durations from the headers); None keeps all. Bounds the memory of a :class:`MemoryStore`."""
    if minutes is None:
        return clips
    keep = []
    for category in sorted({c.label for c in clips}):
        pool = [c for c in clips if c.label == category]
        total = 0.0
        for i in rng.permutation(len(pool)):
            seconds = sf.info(str(pool[i].path)).duration
            if total + seconds > minutes * 60 and total > 0:
                continue
            keep.append(pool[i])
            total += seconds
    return sorted(keep, key=lambda c: (str(c.path)))


def _decode(path: Path, rate: int) -> np.ndarray:
    try:
        x, file_rate = sf.read(str(path), dtype="float64", always_2d=True)
    except Exception as e:
        raise MixError(f"{path}: cannot read clip ({e})") from None
    x = x.mean(axis=1)
    return soxr.resample(x, file_rate, rate) if file_rate != rate else x


class ClipCache:
    """Decoded clips (mono float64 at the scene rate) and their audible segments, loaded on first use."""

    def __init__(self, sample_rate_hz: int, label_db: float, min_gap_s: float):
        self.rate, self.label_db, self.min_gap_s = sample_rate_hz, label_db, min_gap_s
        self._cache: dict[Path, tuple[np.ndarray, list[tuple[int, int]]]] = {}

    def get(self, clip: Clip) -> tuple[np.ndarray, list[tuple[int, int]]]:
        if clip.path not in self._cache:
            x = _decode(clip.path, self.rate)
            segments = audible_segments(x, self.rate, self.label_db, self.min_gap_s)
            if not segments:
                raise MixError(f"{clip.path}: clip is silent")
            self._cache[clip.path] = (x, segments)
        return self._cache[clip.path]

    def piece(self, clip: Clip, rng: np.random.Generator, max_len: int) -> np.ndarray:
        """A random piece of at most max_len samples (a copy)."""
        x = self.get(clip)[0]
        start = excerpt_start(rng, len(x), max_len)
        return x[start:start + max_len].copy()


class MemoryStore:
    """Every clip decoded once, up front, as int16 at the scene rate (half of float32's memory; the
    pools are 16-bit already), with its audible segments. ``get`` returns float64 copies.

    Forked DataLoader workers share the arrays copy-on-write: nothing writes to them."""

    def __init__(self, clips: list[Clip], sample_rate_hz: int, label_db: float, min_gap_s: float):
        self.rate = sample_rate_hz
        self._audio: dict[Path, np.ndarray] = {}
        self._segments: dict[Path, list[tuple[int, int]]] = {}
        silent = []
        for clip in clips:
            if clip.path in self._audio:
                continue
            x = _decode(clip.path, sample_rate_hz)
            segments = audible_segments(x, sample_rate_hz, label_db, min_gap_s)
            if not segments:
                silent.append(clip.path)
                continue
            self._audio[clip.path] = np.round(np.clip(x, -1.0, 32767 / 32768) * 32768).astype(np.int16)
            self._segments[clip.path] = segments
        self.silent = silent

    def __contains__(self, clip: Clip) -> bool:
        return clip.path in self._audio

    @property
    def seconds(self) -> float:
        return sum(len(x) for x in self._audio.values()) / self.rate

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self._audio.values())

    def get(self, clip: Clip) -> tuple[np.ndarray, list[tuple[int, int]]]:
        try:
            x = self._audio[clip.path]
        except KeyError:
            raise MixError(f"{clip.path}: not in the store (silent or not loaded)") from None
        return x.astype(np.float64) / 32768.0, self._segments[clip.path]

    def piece(self, clip: Clip, rng: np.random.Generator, max_len: int) -> np.ndarray:
        """A random piece of at most max_len samples (float64; only the piece is converted)."""
        try:
            x = self._audio[clip.path]
        except KeyError:
            raise MixError(f"{clip.path}: not in the store (silent or not loaded)") from None
        start = excerpt_start(rng, len(x), max_len)
        return x[start:start + max_len].astype(np.float64) / 32768.0
