"""Scene synthesis: long polyphonic scenes with strong labels, mixed from isolated clips.

In the spirit of TUT-SED Synthetic 2016: isolated event clips are placed at random times with
random gains, at most ``max_polyphony`` labelled events sounding at once; optional beds (a noise
bed and/or looped clips of chosen classes) and unlabelled distractor clips from a second pool.
Run ``python -m train.synth --help``; output::

    <out>/<split>/audio/<split>_<index>.wav    mono, sample_rate_hz, PCM_16 or FLOAT
    <out>/<split>/annotations.tsv              DCASE TSV (scenes without events listed by empty rows)
    <out>/manifest.json                        parameters, seed, labels, every source clip used
                                               with its licence/author/URL for attribution

Choices:

- **Pools**: a folder with ``meta.csv`` (``filename`` relative to the folder, ``class``, and
  optionally ``fold``, ``source_clip_id``, ``clip_license``, ``freesound_author``, ``freesound_url``,
  ``source_dataset``), or one sub-folder per class. Without a fold, ESC-style names
  ``<fold>-<id>-<take>`` give it; otherwise a CRC32 of the recording id picks one.
- **Splits by fold** (default train 1-2, validate 3, test 4): a clip's recording (its Freesound
  sound id where known) may feed one split only; this is checked, not assumed.
- **Labels follow the audible extent**: the clip (mono, at the scene rate) is cut into 20 ms frames;
  frames whose RMS is within ``label_db`` (30 dB, the same rule as the pools' core_start_s /
  core_end_s) of the loudest frame are active; active runs closer than ``min_gap_s`` merge and each
  remaining run is one event. A gain scales every frame alike, so the rule is gain-invariant, and
  the silent tail of a clip is never labelled. (The envelope is computed, not read from
  core_start_s/core_end_s, so folder pools and internal gaps are handled the same way; on ESC-10
  the two agree to the frame for most clips.) Masking by beds, noise or other events is not
  modelled: a quiet event under a loud bed is still labelled, as in TUT-SED 2016.
- **Gains**: each event's RMS over its labelled samples is set to a level drawn uniformly from
  ``event_db`` dBFS, but no clip may peak above ``max_peak_db``; if the final mix still peaks above
  0.99 the whole scene is scaled down (recorded as ``scale``; labels are unaffected).
- **Polyphony** counts labelled events only; two events of one class never overlap. An event that
  finds no admissible onset in ``max_attempts`` tries is dropped (counted in the manifest).
- **Beds**: bed classes come from the event pool and are removed from the labelled classes, so a
  labelled class never sounds unlabelled. **Distractors**: the distractor pool's categories, sorted
  by name, are halved: the first half feeds train scenes, the second validation and test scenes.
- **Reproducible**: scene k of split s draws from ``default_rng([seed, s, k])``; same inputs and
  seed give identical bytes (the float WAV PEAK chunk, which holds a timestamp, is disabled).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from train.annotations import Event, write_dcase_tsv
from train.datasets import AUDIO_EXTENSIONS, SILENCE_PEAK, SPLITS

ENVELOPE_FRAME_S = 0.02
_FREESOUND_ID = re.compile(r"/sounds/(\d+)")
_ESC_NAME = re.compile(r"^(\d+)-(\d+)-[A-Za-z]+$")


class SynthError(ValueError):
    """Inputs that cannot make the requested scenes; the message names the clip, class or split."""


@dataclass(frozen=True)
class Clip:
    """One isolated source clip of a pool."""

    path: Path
    filename: str  # relative to the pool root, as in meta.csv
    label: str
    fold: int
    recording_id: str  # clips of one original recording share it
    license: str = ""
    author: str = ""
    url: str = ""
    source_dataset: str = ""


def _recording_id(stem: str, url: str, source_clip_id: str, label: str) -> str:
    """Freesound sound id from the URL or an ESC-style name (<fold>-<sound id>-<take>), else per clip."""
    if m := _FREESOUND_ID.search(url):
        return f"freesound:{m[1]}"
    if m := _ESC_NAME.match(source_clip_id or stem):
        return f"freesound:{m[2]}"
    return f"{label}/{source_clip_id or stem}"


def load_pool(root: str | Path, n_hash_folds: int = 4) -> list[Clip]:
    """Clips of a pool folder (meta.csv, or one sub-folder per class), sorted by filename."""
    root = Path(root)
    rows: list[dict[str, str]] = []
    if (root / "meta.csv").is_file():
        with open(root / "meta.csv", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"filename", "class"} - set(reader.fieldnames or ())
            if missing:
                raise SynthError(f"{root / 'meta.csv'}: missing column(s) {sorted(missing)}")
            rows = list(reader)
    elif root.is_dir():
        rows = [{"filename": p.relative_to(root).as_posix(), "class": d.name}
                for d in sorted(root.iterdir()) if d.is_dir()
                for p in sorted(d.iterdir()) if p.suffix.lower() in AUDIO_EXTENSIONS]
    if not rows:
        raise SynthError(f"{root}: no clips (expected meta.csv or one sub-folder of audio per class)")
    clips = []
    for row in rows:
        path, label = root / row["filename"], row["class"].strip()
        if not path.is_file():
            raise SynthError(f"{root}: clip {row['filename']!r} listed but missing")
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


def audible_segments(x: np.ndarray, sample_rate_hz: int, label_db: float, min_gap_s: float,
                     frame_s: float = ENVELOPE_FRAME_S) -> list[tuple[int, int]]:
    """Audible runs of a mono clip x: (n,), as sample ranges [a, b), on a frame grid of frame_s.

    A frame is active when its RMS is within ``label_db`` of the loudest frame's; runs separated
    by less than ``min_gap_s`` of inactive frames are merged. Empty for a silent clip."""
    frame = max(1, round(frame_s * sample_rate_hz))
    n_frames = -(-len(x) // frame)
    padded = np.zeros(n_frames * frame)
    padded[: len(x)] = x
    counts = np.full(n_frames, frame, dtype=np.float64)
    counts[-1] = len(x) - (n_frames - 1) * frame
    rms = np.sqrt((padded.reshape(n_frames, frame) ** 2).sum(axis=1) / counts)
    if not rms.max() >= SILENCE_PEAK:
        return []
    active = rms >= rms.max() * 10 ** (-label_db / 20)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], active.astype(np.int8), [0]))))
    runs = [[int(a), int(b)] for a, b in zip(edges[::2], edges[1::2])]
    merged = [runs[0]]
    for a, b in runs[1:]:
        if (a - merged[-1][1]) * frame < min_gap_s * sample_rate_hz:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return [(a * frame, min(b * frame, len(x))) for a, b in merged]


@dataclass(frozen=True)
class SynthConfig:
    """Every parameter of a synthesis run (recorded in manifest.json). Levels in dBFS (RMS)."""

    pool: str
    distractors: str | None = None
    seed: int = 0
    scene_s: float = 60.0
    sample_rate_hz: int = 16000
    subtype: str = "PCM_16"
    scenes: tuple[int, int, int] = (30, 10, 10)  # train, validate, test
    folds: tuple[tuple[int, ...], ...] = ((1, 2), (3,), (4,))
    classes: tuple[str, ...] | None = None  # None: every pool class that is not a bed class
    licenses: tuple[str, ...] | None = None
    max_polyphony: int = 5
    events_per_minute: float = 24.0
    event_db: tuple[float, float] = (-35.0, -20.0)
    label_db: float = 30.0
    min_gap_s: float = 1.0
    bed_classes: tuple[str, ...] = ()
    bed_db: float = -40.0
    noise: str = "none"
    noise_db: float = -65.0
    distractors_per_minute: float = 6.0
    distractor_db: tuple[float, float] = (-40.0, -25.0)
    max_peak_db: float = -6.0  # no event or distractor peaks above this after its gain
    max_attempts: int = 50

    def __post_init__(self) -> None:
        checks = [
            (self.scene_s > 0, "scene_s must be > 0"),
            (self.sample_rate_hz > 0, "sample_rate_hz must be > 0"),
            (self.subtype in ("PCM_16", "FLOAT"), "subtype must be PCM_16 or FLOAT"),
            (len(self.scenes) == len(SPLITS) and min(self.scenes) >= 0 and sum(self.scenes) > 0,
             f"scenes must give {len(SPLITS)} counts >= 0 ({', '.join(SPLITS)}), not all zero"),
            (len(self.folds) == len(SPLITS), f"folds must give one tuple per split {SPLITS}"),
            (self.max_polyphony >= 1, "max_polyphony must be >= 1"),
            (self.event_db[0] <= self.event_db[1] and self.distractor_db[0] <= self.distractor_db[1],
             "level ranges must be (low, high)"),
            (self.label_db > 0 and self.min_gap_s >= 0, "label_db must be > 0 and min_gap_s >= 0"),
            (self.noise in ("none", "white", "pink", "brown"), "noise must be none, white, pink or brown"),
            (self.events_per_minute >= 0 and self.distractors_per_minute >= 0, "rates must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise SynthError(f"SynthConfig: {message}")
        seen: dict[int, str] = {}
        for split, folds in zip(SPLITS, self.folds):
            for fold in folds:
                if fold in seen:
                    raise SynthError(f"SynthConfig: fold {fold} is in both {seen[fold]} and {split}")
                seen[fold] = split

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


class _ClipCache:
    """Decoded clips (mono float64 at the scene rate) and their audible segments, loaded once."""

    def __init__(self, sample_rate_hz: int, label_db: float, min_gap_s: float):
        self.rate, self.label_db, self.min_gap_s = sample_rate_hz, label_db, min_gap_s
        self._cache: dict[Path, tuple[np.ndarray, list[tuple[int, int]]]] = {}

    def get(self, clip: Clip) -> tuple[np.ndarray, list[tuple[int, int]]]:
        if clip.path not in self._cache:
            try:
                x, rate = sf.read(str(clip.path), dtype="float64", always_2d=True)
            except Exception as e:
                raise SynthError(f"{clip.path}: cannot read clip ({e})") from None
            x = x.mean(axis=1)
            if rate != self.rate:
                x = soxr.resample(x, rate, self.rate)
            segments = audible_segments(x, self.rate, self.label_db, self.min_gap_s)
            if not segments:
                raise SynthError(f"{clip.path}: clip is silent")
            self._cache[clip.path] = (x, segments)
        return self._cache[clip.path]


def _rms(x: np.ndarray, segments: list[tuple[int, int]]) -> float:
    return float(np.sqrt(np.mean(np.concatenate([x[a:b] for a, b in segments]) ** 2)))


def _fits(new: list[tuple[int, int]], label: str, placed: list[tuple[str, int, int]], max_poly: int) -> bool:
    """True if the segments ``new`` of class ``label`` overlap no event of their class and keep the
    count of sounding labelled events <= max_poly everywhere."""
    for a, b in new:
        overlapping = [(pa, pb) for pl, pa, pb in placed if pa < b and a < pb]
        if any(pl == label and pa < b and a < pb for pl, pa, pb in placed):
            return False  # one class never overlaps itself: its label cells would merge the two
        # The count of intervals covering a point only rises at an onset: check a and the onsets inside.
        for p in [a] + [pa for pa, _ in overlapping if a < pa]:
            if sum(pa <= p < pb for pa, pb in overlapping) + 1 > max_poly:
                return False
    return True


def _noise(rng: np.random.Generator, n: int, colour: str) -> np.ndarray:
    white = rng.standard_normal(n)
    if colour == "white":
        return white
    spectrum = np.fft.rfft(white)
    freqs = np.fft.rfftfreq(n)
    exponent = 0.5 if colour == "pink" else 1.0  # amplitude ~ f^-1/2 (pink) or f^-1 (brown)
    spectrum[1:] /= freqs[1:] ** exponent
    spectrum[0] = 0.0
    return np.fft.irfft(spectrum, n)


def _at_level(x: np.ndarray, level_db: float, rms: float, max_peak_db: float = np.inf) -> np.ndarray:
    """x scaled to RMS level_db (dBFS, rms measured by the caller), unless its peak would pass
    max_peak_db: sparse sounds (knocks, clicks) have a low RMS and would otherwise get a huge gain."""
    gain = 10 ** (level_db / 20) / rms
    peak = float(np.max(np.abs(x)))
    return x * min(gain, 10 ** (max_peak_db / 20) / peak) if peak > 0 else x


def _make_scene(rng: np.random.Generator, cfg: SynthConfig, cache: _ClipCache, pool: dict[str, list[Clip]],
                beds: dict[str, list[Clip]], distractors: list[Clip]):
    """One scene: (mix (n,) float64, labelled [(label, a, b)] in samples, [(clip, role)], dropped)."""
    n = round(cfg.scene_s * cfg.sample_rate_hz)
    rate = cfg.sample_rate_hz
    mix = np.zeros(n)
    used: list[tuple[Clip, str]] = []
    if cfg.noise != "none":
        noise = _noise(rng, n, cfg.noise)
        mix += _at_level(noise, cfg.noise_db, float(np.sqrt(np.mean(noise**2))))
    if beds:
        names = sorted(beds)
        choices = beds[names[int(rng.integers(len(names)))]]
        bed, pos, fade = np.zeros(n), 0, round(0.05 * rate)
        while pos < n:  # loop random clips of the bed class with 50 ms cross-fades
            clip = choices[int(rng.integers(len(choices)))]
            x = cache.get(clip)[0].copy()
            k = min(fade, len(x) // 2)
            ramp = np.linspace(0.0, 1.0, k, endpoint=False)
            x[:k] *= ramp
            x[len(x) - k:] *= ramp[::-1]
            start = max(pos - k, 0)
            end = min(start + len(x), n)
            bed[start:end] += x[: end - start]
            pos = start + len(x)
            used.append((clip, "bed"))
        mix += _at_level(bed, cfg.bed_db, float(np.sqrt(np.mean(bed**2))))

    placed: list[tuple[str, int, int]] = []
    classes, dropped = sorted(pool), 0
    for _ in range(round(cfg.events_per_minute * cfg.scene_s / 60)):
        label = classes[int(rng.integers(len(classes)))]
        clip = pool[label][int(rng.integers(len(pool[label])))]
        x, segments = cache.get(clip)
        length = min(len(x), n)
        for _attempt in range(cfg.max_attempts):
            start = int(rng.integers(0, n - length + 1))
            new = [(start + a, start + min(b, length)) for a, b in segments if a < length]
            if _fits(new, label, placed, cfg.max_polyphony):
                break
        else:
            dropped += 1
            continue
        level = rng.uniform(*cfg.event_db)
        mix[start:start + length] += _at_level(x[:length], level, _rms(x, segments), cfg.max_peak_db)
        placed += [(label, a, b) for a, b in new]
        used.append((clip, "event"))

    if distractors:
        for _ in range(round(cfg.distractors_per_minute * cfg.scene_s / 60)):
            clip = distractors[int(rng.integers(len(distractors)))]
            x, segments = cache.get(clip)
            length = min(len(x), n)
            start = int(rng.integers(0, n - length + 1))
            level = rng.uniform(*cfg.distractor_db)
            mix[start:start + length] += _at_level(x[:length], level, _rms(x, segments), cfg.max_peak_db)
            used.append((clip, "distractor"))
    return mix, placed, used, dropped


def _write_wav(path: Path, x: np.ndarray, rate: int, subtype: str) -> None:
    with sf.SoundFile(str(path), "w", rate, 1, subtype=subtype, format="WAV") as f:
        if subtype == "FLOAT":
            # libsndfile's PEAK chunk carries a timestamp; SFC_SET_ADD_PEAK_CHUNK (0x1050) off
            # keeps same-seed output byte-identical.
            sf._snd.sf_command(f._file, 0x1050, sf._ffi.NULL, 0)
        f.write(x.astype(np.float32))


def _split_pools(cfg: SynthConfig):
    """Per split: (event pool by class, bed pool by class, distractor clips); checks every rule."""
    n_hash = max(max(f) for f in cfg.folds if f) if any(cfg.folds) else 4
    all_clips = load_pool(cfg.pool, n_hash)
    clips = filter_licenses(all_clips, cfg.licenses)
    if not clips:
        raise SynthError(f"{cfg.pool}: no clip passes the licence filter {cfg.licenses}")
    pool_classes = sorted({c.label for c in all_clips})
    unknown = sorted((set(cfg.bed_classes) | set(cfg.classes or ())) - set(pool_classes))
    if unknown:
        raise SynthError(f"{cfg.pool}: unknown class(es) {unknown}; pool classes are {pool_classes}")
    if set(cfg.bed_classes) & set(cfg.classes or ()):
        raise SynthError(f"classes {sorted(set(cfg.bed_classes) & set(cfg.classes or ()))} are both "
                         "labelled and bed classes")
    labels = sorted(cfg.classes or (set(pool_classes) - set(cfg.bed_classes)))
    halves: list[list[str]] = [[], []]
    d_clips: list[Clip] = []
    if cfg.distractors:
        d_all = load_pool(cfg.distractors, n_hash)
        categories = sorted({c.label for c in d_all})  # before the licence filter: fixed halves
        clash = sorted(set(categories) & set(pool_classes))
        if clash:
            raise SynthError(f"{cfg.distractors}: distractor categories {clash} are also event classes")
        halves = [categories[: len(categories) // 2], categories[len(categories) // 2:]]
        d_clips = filter_licenses(d_all, cfg.licenses)
    out, problems = {}, []
    for i, split in enumerate(SPLITS):
        folds = set(cfg.folds[i])
        in_split = [c for c in clips if c.fold in folds]
        pool = {label: [c for c in in_split if c.label == label] for label in labels}
        beds = {label: [c for c in in_split if c.label == label] for label in cfg.bed_classes}
        half = set(halves[0 if i == 0 else 1])
        dis = [c for c in d_clips if c.label in half]
        if cfg.scenes[i]:
            problems += [f"split {split} (folds {sorted(folds)}): no {'bed ' if label in beds else ''}clip "
                         f"of class {label!r} after the licence filter"
                         for label, cs in {**pool, **beds}.items() if not cs]
            if cfg.distractors and not dis:
                problems.append(f"split {split}: no distractor clip in categories {sorted(half)}")
        out[split] = (pool, beds, dis)
    if problems:
        raise SynthError("cannot synthesise:\n  " + "\n  ".join(problems))
    # No recording may feed two splits (events and beds), nor train and the other splits (distractors).
    owner: dict[str, str] = {}
    for split, (pool, beds, dis) in out.items():
        for c in [c for cs in list(pool.values()) + list(beds.values()) for c in cs]:
            if owner.setdefault(c.recording_id, split) != split:
                raise SynthError(f"recording {c.recording_id} ({c.filename}) is in folds of both "
                                 f"{owner[c.recording_id]} and {split}")
    train_d = {c.recording_id for c in out["train"][2]}
    for split in SPLITS[1:]:
        both = train_d & {c.recording_id for c in out[split][2]}
        if both:
            raise SynthError(f"distractor recordings {sorted(both)[:5]} feed train and {split}")
    return labels, halves, out


def synthesize(cfg: SynthConfig, out_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the scenes of every split with scenes > 0 and manifest.json under out_dir; return the manifest."""
    out_dir = Path(out_dir)
    labels, halves, pools = _split_pools(cfg)
    for split in SPLITS:
        audio_dir = out_dir / split / "audio"
        stale = sorted(audio_dir.glob("*.wav")) if audio_dir.is_dir() else []
        if stale and not overwrite:
            raise SynthError(f"{audio_dir}: already holds {len(stale)} WAV files; pass overwrite=True (--overwrite)")
        for p in stale:
            p.unlink()
    cache = _ClipCache(cfg.sample_rate_hz, cfg.label_db, cfg.min_gap_s)
    manifest: dict[str, Any] = {"format": "rtsed-synth/1", "config": cfg.to_dict(), "labels": labels,
                                "distractor_categories": {"train": halves[0], "validate+test": halves[1]},
                                "splits": {}}
    for i, split in enumerate(SPLITS):
        if not cfg.scenes[i]:
            continue
        pool, beds, dis = pools[split]
        (out_dir / split / "audio").mkdir(parents=True, exist_ok=True)
        events, names, scenes, uses = [], [], [], {}
        for k in range(cfg.scenes[i]):
            rng = np.random.default_rng([cfg.seed, i, k])
            mix, placed, used, dropped = _make_scene(rng, cfg, cache, pool, beds, dis)
            peak = float(np.max(np.abs(mix)))
            scale = 0.99 / peak if peak > 0.99 else 1.0
            name = f"{split}_{k:04d}.wav"
            _write_wav(out_dir / split / "audio" / name, mix * scale, cfg.sample_rate_hz, cfg.subtype)
            events += [Event(name, a / cfg.sample_rate_hz, b / cfg.sample_rate_hz, label) for label, a, b in placed]
            names.append(name)
            scenes.append({"file": name, "events": len(placed), "dropped_events": dropped, "scale": scale})
            for clip, role in used:
                uses[(clip, role)] = uses.get((clip, role), 0) + 1
        write_dcase_tsv(out_dir / split / "annotations.tsv", events, names)
        clips = [{"file": c.filename, "class": c.label, "role": role, "uses": count, "fold": c.fold,
                  "recording_id": c.recording_id, "license": c.license, "author": c.author, "url": c.url,
                  "source_dataset": c.source_dataset}
                 for (c, role), count in sorted(uses.items(), key=lambda kv: (kv[0][1], kv[0][0].filename))]
        manifest["splits"][split] = {"folds": list(cfg.folds[i]), "scenes": scenes, "clips": clips}
    authors = {(c["author"], c["url"], c["license"], c["source_dataset"])
               for s in manifest["splits"].values() for c in s["clips"]}
    manifest["attribution"] = [dict(zip(("author", "url", "license", "source_dataset"), a)) for a in sorted(authors)]
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _folds(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in _csv(text))


def main(argv: list[str] | None = None) -> int:
    d = {f.name: f.default for f in dataclasses.fields(SynthConfig)}  # one source of defaults
    p = argparse.ArgumentParser(prog="python -m train.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", required=True, help="event clips: folder with meta.csv or one sub-folder per class")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--distractors", help="pool of unlabelled distractor clips (its categories are halved)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--scene-s", type=float, default=d["scene_s"], help="scene length in seconds")
    p.add_argument("--sample-rate", type=int, default=d["sample_rate_hz"],
                   help="scene rate in Hz (clips are resampled)")
    p.add_argument("--subtype", choices=("PCM_16", "FLOAT"), default=d["subtype"])
    p.add_argument("--scenes", type=int, nargs=3, default=d["scenes"], metavar=("TRAIN", "VALIDATE", "TEST"))
    for split, folds in zip(SPLITS, d["folds"]):
        p.add_argument(f"--{split}-folds", type=_folds, default=folds, help="comma-separated folds")
    p.add_argument("--classes", type=_csv, help="labelled classes (default: all that are not bed classes)")
    p.add_argument("--licenses", type=_csv, help="keep only clips with these clip_license values, e.g. CC0,CC-BY")
    p.add_argument("--max-polyphony", type=int, default=d["max_polyphony"])
    p.add_argument("--events-per-minute", type=float, default=d["events_per_minute"])
    p.add_argument("--event-db-min", type=float, default=d["event_db"][0], help="event RMS level range, dBFS")
    p.add_argument("--event-db-max", type=float, default=d["event_db"][1])
    p.add_argument("--max-peak-db", type=float, default=d["max_peak_db"],
                   help="cap on a single clip's peak after its gain, dBFS")
    p.add_argument("--label-db", type=float, default=d["label_db"],
                   help="label frames within this many dB of the clip's loudest frame")
    p.add_argument("--min-gap-s", type=float, default=d["min_gap_s"],
                   help="quiet gaps shorter than this stay inside one event")
    p.add_argument("--bed-classes", type=_csv, default=(), help="classes looped as unlabelled background beds")
    p.add_argument("--bed-db", type=float, default=d["bed_db"])
    p.add_argument("--noise", choices=("none", "white", "pink", "brown"), default=d["noise"])
    p.add_argument("--noise-db", type=float, default=d["noise_db"])
    p.add_argument("--distractors-per-minute", type=float, default=d["distractors_per_minute"])
    p.add_argument("--distractor-db-min", type=float, default=d["distractor_db"][0])
    p.add_argument("--distractor-db-max", type=float, default=d["distractor_db"][1])
    p.add_argument("--overwrite", action="store_true", help="replace WAV files of an earlier run")
    a = p.parse_args(argv)
    cfg = SynthConfig(
        pool=a.pool, distractors=a.distractors, seed=a.seed, scene_s=a.scene_s, sample_rate_hz=a.sample_rate,
        subtype=a.subtype, scenes=tuple(a.scenes), folds=(a.train_folds, a.validate_folds, a.test_folds),
        classes=a.classes, licenses=a.licenses, max_polyphony=a.max_polyphony,
        events_per_minute=a.events_per_minute, event_db=(a.event_db_min, a.event_db_max), label_db=a.label_db,
        max_peak_db=a.max_peak_db,
        min_gap_s=a.min_gap_s, bed_classes=a.bed_classes, bed_db=a.bed_db, noise=a.noise, noise_db=a.noise_db,
        distractors_per_minute=a.distractors_per_minute, distractor_db=(a.distractor_db_min, a.distractor_db_max),
    )
    try:
        manifest = synthesize(cfg, a.out, overwrite=a.overwrite)
    except SynthError as e:
        p.exit(2, f"error: {e}\n")
    for split, info in manifest["splits"].items():
        n_events = sum(s["events"] for s in info["scenes"])
        print(f"{split}: {len(info['scenes'])} scenes, {n_events} events, {len(info['clips'])} clip uses -> "
              f"{Path(a.out) / split}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
