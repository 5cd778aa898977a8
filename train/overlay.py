"""``python -m train.overlay``: the same scenes again, over real speech and music.

    python -m train.overlay --scenes scenes/ --split test --world ../shared/data/negatives-test \\
        --out scenes-over-speech-music --seed 7

Each scene of ``--scenes``'s split keeps its audio and its events; speech and music from the
``--world`` folder (``meta.csv`` with ``filename`` and ``category``: speech, music, ...) are added
under and between them, and labelled as a listener would: ``speech`` by each utterance's audible
extent (train.mixing's envelope rule), ``music`` over the whole span it plays (a bed). So a detector
scored on both folders is scored on the same target events with and without the sound a
microphone hears most of the day: the difference is what that sound costs it.

Levels are relative to the scene's own events: the scene's RMS over its labelled samples is E dBFS;
music plays at E + ``--music-db`` and each utterance at E + ``--speech-db`` (ranges, drawn per
scene and per utterance). Scene k draws from ``default_rng([seed, k])``: same inputs, same bytes.
The output is a train.synth folder (``<split>/audio``, ``<split>/annotations.tsv``,
``manifest.json`` with the labels and every world file used, for attribution).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from rtsed.audio.files import AudioFileError, read_audio
from rtsed.metrics import merge_overlaps
from train.annotations import Event, read_dcase_tsv, write_dcase_tsv
from train.mixing import MixError, audible_segments
from train.pools import load_world

LABEL_DB = 30.0  # train.mixing's audible-extent rule
MIN_GAP_S = 0.3  # pauses shorter than this stay inside one speech event


class OverlayError(ValueError):
    """Inputs that cannot be overlaid; the message names the file or folder and the fix."""


def _world_files(root: Path) -> dict[str, list[tuple[Path, str]]]:
    """{category: [(path, its licence and attribution)]} of a world folder (train.pools' reader)."""
    if not (root / "meta.csv").is_file():
        raise OverlayError(f"--world {root}: no meta.csv (filename, category, source, group columns) in it")
    try:
        clips = load_world([str(root)])
    except MixError as exc:
        raise OverlayError(f"--world {root}: {exc}") from None
    out: dict[str, list[tuple[Path, str]]] = {}
    for clip in clips:
        out.setdefault(clip.label, []).append((clip.path, "; ".join(x for x in (clip.license, clip.author) if x)))
    for category in ("speech", "music"):
        if not out.get(category):
            raise OverlayError(f"--world {root}: meta.csv lists no {category} files")
    return out


def _rms_db(x: np.ndarray) -> float:
    return 10 * np.log10(max(float(np.mean(x**2)), 1e-20))


def _scaled(x: np.ndarray, level_db: float, rms_db: float) -> np.ndarray:
    return x * 10 ** ((level_db - rms_db) / 20)


def overlay_scene(scene: np.ndarray, events: list[Event], rate: int, world: dict[str, list[tuple[Path, str]]],
                  rng: np.random.Generator, music_p: float, music_cover: tuple[float, float],
                  music_db: tuple[float, float], speech_per_minute: float, speech_db: tuple[float, float],
                  used: list[tuple[str, str]]) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """scene: (n,) float64 audio with its events -> (audio with speech and music added, the added
    events as (label, onset_s, offset_s)). ``used`` collects (file, credit) of every world file."""
    n = scene.shape[0]
    mask = np.zeros(n, bool)
    for e in events:
        mask[int(e.onset_s * rate):int(np.ceil(e.offset_s * rate))] = True
    event_db = _rms_db(scene[mask]) if mask.any() else _rms_db(scene)
    out = scene.copy()
    added: list[tuple[str, float, float]] = []
    if rng.random() < music_p:
        length = max(1, round(rng.uniform(*music_cover) * n))
        start = int(rng.integers(0, n - length + 1))
        bed = np.zeros(length)
        pos = 0
        while pos < length:
            path, credit = world["music"][int(rng.integers(len(world["music"])))]
            x = read_audio(path, rate).astype(np.float64)
            if x.size > length - pos:  # a random excerpt of a long track
                a = int(rng.integers(0, x.size - (length - pos) + 1))
                x = x[a:a + length - pos]
            bed[pos:pos + x.size] += x
            pos += max(x.size, 1)
            used.append((str(path), credit))
        fade = min(round(0.5 * rate), length // 4)
        if fade:
            bed[:fade] *= np.linspace(0.0, 1.0, fade, endpoint=False)
            bed[length - fade:] *= np.linspace(1.0, 0.0, fade, endpoint=False)
        if np.any(bed):
            out[start:start + length] += _scaled(bed, event_db + rng.uniform(*music_db), _rms_db(bed))
            added.append(("music", start / rate, (start + length) / rate))
    for _ in range(int(rng.poisson(speech_per_minute * n / rate / 60))):
        path, credit = world["speech"][int(rng.integers(len(world["speech"])))]
        x = read_audio(path, rate).astype(np.float64)[:n]
        segments = audible_segments(x, rate, LABEL_DB, MIN_GAP_S)
        if not segments:
            continue
        start = int(rng.integers(0, n - x.size + 1))
        voiced = np.concatenate([x[a:b] for a, b in segments])
        out[start:start + x.size] += _scaled(x, event_db + rng.uniform(*speech_db), _rms_db(voiced))
        added += [("speech", (start + a) / rate, (start + b) / rate) for a, b in segments]
        used.append((str(path), credit))
    return out, added


def overlay(scenes: Path, split: str, world_root: Path, out: Path, seed: int = 7, music_p: float = 0.6,
            music_cover: tuple[float, float] = (0.3, 1.0), music_db: tuple[float, float] = (-12.0, 0.0),
            speech_per_minute: float = 12.0, speech_db: tuple[float, float] = (-10.0, 5.0)) -> dict:
    """Write ``out`` (see the module docstring); returns its manifest."""
    src = scenes / split
    tsv = src / "annotations.tsv"
    if not tsv.is_file():
        raise OverlayError(f"--scenes {scenes}: no {split}/annotations.tsv (a train.synth folder is expected)")
    if (out / split).exists() and any((out / split).iterdir()):
        raise OverlayError(f"--out {out}: {split}/ already holds files; choose another folder or remove it")
    world = _world_files(world_root)
    reference = read_dcase_tsv(tsv)
    by_file: dict[str, list[Event]] = {}
    for e in reference:
        by_file.setdefault(e.filename, []).append(e)
    files = sorted(p for p in (src / "audio").iterdir() if p.suffix.lower() in (".wav", ".flac"))
    if not files:
        raise OverlayError(f"--scenes {scenes}: {split}/audio holds no scenes")
    (out / split / "audio").mkdir(parents=True, exist_ok=True)
    rows: list[Event] = []
    used: list[tuple[str, str]] = []
    for k, path in enumerate(files):
        info = sf.info(path)
        x, rate = sf.read(path, dtype="float64")
        events = by_file.get(path.name, [])
        rng = np.random.default_rng([seed, k])
        mixed, added = overlay_scene(x, events, rate, world, rng, music_p, music_cover, music_db,
                                     speech_per_minute, speech_db, used)
        peak = float(np.max(np.abs(mixed)))
        if peak > 0.99:  # labels do not depend on the scale
            mixed *= 0.99 / peak
        sf.write(out / split / "audio" / path.name, mixed, rate, subtype=info.subtype)
        rows += events
        merged, _ = merge_overlaps({path.name: [(a, b, label) for label, a, b in added]})
        rows += [Event(path.name, a, b, label) for a, b, label in merged[path.name]]
    write_dcase_tsv(out / split / "annotations.tsv", rows, [p.name for p in files])
    source_manifest = scenes / "manifest.json"
    labels = json.loads(source_manifest.read_text()).get("labels", []) if source_manifest.is_file() else \
        sorted({e.event_label for e in reference})
    labels = list(labels) + [c for c in ("speech", "music") if c not in labels]
    manifest = {
        "format": "rtsed-overlay", "scenes": str(scenes), "split": split, "world": str(world_root), "seed": seed,
        "config": {"music_p": music_p, "music_cover": list(music_cover), "music_db": list(music_db),
                   "speech_per_minute": speech_per_minute, "speech_db": list(speech_db)},
        "labels": labels,
        "world_files": sorted({f"{f}\t{c}" for f, c in used}),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    try:
        return float(lo), float(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write LOW,HIGH in dB, e.g. -12,0") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.overlay", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", required=True, type=Path, help="a train.synth folder")
    p.add_argument("--split", default="test")
    p.add_argument("--world", required=True, type=Path, help="folder of speech and music with meta.csv")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--music-p", type=float, default=0.6, help="share of scenes with a music bed")
    p.add_argument("--music-db", type=_range, default=(-12.0, 0.0), help="music level vs the scene's events, dB")
    p.add_argument("--speech-per-minute", type=float, default=12.0)
    p.add_argument("--speech-db", type=_range, default=(-10.0, 5.0), help="speech level vs the scene's events, dB")
    a = p.parse_args(argv)
    try:
        manifest = overlay(a.scenes, a.split, a.world, a.out, a.seed, a.music_p, music_db=a.music_db,
                           speech_per_minute=a.speech_per_minute, speech_db=a.speech_db)
    except (OverlayError, AudioFileError, OSError) as exc:
        print(f"train.overlay: error: {exc}", file=sys.stderr)
        return 2
    print(f"{a.split}: {len(list((a.out / a.split / 'audio').iterdir()))} scenes over speech and music from "
          f"{a.world} ({len(manifest['world_files'])} world files) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
