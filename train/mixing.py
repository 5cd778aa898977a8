"""One scene mixer for both offline scene files (``python -m train.synth``) and the scenes that
on-the-fly training mixes afresh every epoch (``train.onthefly``).

A scene is drawn from one ``numpy.random.Generator`` and nothing else, so (seed, split or epoch,
index) fixes it. In order:

1. the background: optional coloured noise (``noise``, ``noise_db``), optional looped beds of
   event-pool classes (``bed_classes``, unlabelled), and, with a world pool, a looped bed of
   everyday sound at the scene's background level B (drawn from ``background_db``);
2. music (world): with probability ``music_p`` a run of music tracks over a random span of the
   scene (``music_cover`` of its length) at B + ``music_ebr_db``; labelled ``music`` over the whole
   placed span when music is a class (a bed, as a listener would annotate it);
3. target events from the event pool (``events_per_minute``, or per scene a rate drawn from
   ``events_per_minute_range``: sparse scenes and busy ones), each at ``event_db`` dBFS or, when
   ``ebr_db`` is set, at B + an event-to-background ratio drawn from ``ebr_db``; at most
   ``max_polyphony`` labelled events at once, never two of one class;
4. speech (world): ``speech_per_minute`` utterances (Poisson) at B + ``speech_ebr_db``, placed
   under the same polyphony rule and labelled ``speech`` by their audible extent when speech is a class;
5. distractors (unlabelled, from a distractor pool) and everyday sounds (world, unlabelled);
6. whole-mix augmentation (microphone colouration, band limits, added noise);
7. level changes of the whole scene: a gain from ``scene_gain_db``, with probability ``ramp_p`` a
   ramp of ``ramp_db`` between two random times (quiet room to loud), with probability
   ``silence_p`` a stretch of digital silence (``silence_s`` long) that cuts every label under it;
   then a scale-down if the peak passes 0.99 (labels are unaffected).

**Labels follow the audible extent**: a clip (after its augmentation, so pitch, time stretch and
reverberation move the labels with the audio) is cut into 20 ms frames; frames whose RMS is within
``label_db`` (30 dB) of the loudest frame are active; active runs closer than ``min_gap_s`` merge
and each remaining run is one event. A gain scales every frame alike, so the rule is
gain-invariant, and the silent tail of a clip is never labelled. Masking by beds, noise or other
events is not modelled (as in TUT-SED 2016): a quiet event under a loud bed is still labelled.

**Gains**: a clip's RMS over its labelled samples is set to its drawn level, but no clip may peak
above ``max_peak_db`` (sparse sounds would otherwise get a huge gain).

With every world and level-change option off, the draws are exactly those of train.synth before
this module existed: old scene files are reproduced byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from train.datasets import SILENCE_PEAK

if TYPE_CHECKING:  # imported when a config is built: train.augment pulls in torch and scipy
    from train.augment import AugmentConfig

ENVELOPE_FRAME_S = 0.02
LABELLED_WORLD = ("speech", "music")  # world categories that become classes; ambience never does


class MixError(ValueError):
    """Inputs that cannot make the requested scenes; the message names the clip, class or split."""


@dataclass(frozen=True)
class Clip:
    """One source clip of a pool (event, bed, distractor or world clip)."""

    path: Path
    filename: str  # relative to the pool root, as in meta.csv
    label: str  # class (event pools) or category (world pools)
    fold: int
    recording_id: str  # clips of one original recording (or world group) share it
    license: str = ""
    author: str = ""
    url: str = ""
    source_dataset: str = ""


def audible_segments(x: np.ndarray, sample_rate_hz: int, label_db: float, min_gap_s: float,
                     frame_s: float = ENVELOPE_FRAME_S) -> list[tuple[int, int]]:
    """Audible runs of a mono clip x: (n,), as sample ranges [a, b), on a frame grid of frame_s.

    A frame is active when its RMS is within ``label_db`` of the loudest frame's; runs separated
    by less than ``min_gap_s`` of inactive frames are merged. Empty for a silent clip."""
    if len(x) == 0:
        return []
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


def _pair(x: Any) -> tuple[float, float] | None:
    return None if x is None else (float(x[0]), float(x[1]))


@dataclass(frozen=True, kw_only=True)
class MixConfig:
    """How one scene is mixed. Levels in dBFS (RMS over the labelled samples); ``*_ebr_db`` are
    relative to the scene's background level B; ranges are (low, high), drawn uniformly.
    Defaults are on-the-fly training's; train.synth's SynthConfig turns the new parts off."""

    scene_s: float = 20.5
    sample_rate_hz: int = 16000
    max_polyphony: int = 5
    events_per_minute: float = 24.0
    events_per_minute_range: tuple[float, float] | None = (6.0, 36.0)  # per-scene density; None: fixed
    event_db: tuple[float, float] = (-35.0, -20.0)  # absolute event levels when ebr_db is None
    ebr_db: tuple[float, float] | None = (0.0, 20.0)  # event-to-background ratio
    label_db: float = 30.0
    min_gap_s: float = 1.0
    bed_db: float = -40.0
    noise: str = "pink"
    noise_db: float = -75.0
    distractors_per_minute: float = 6.0
    distractor_db: tuple[float, float] = (-40.0, -25.0)  # absolute, when ebr_db is None
    distractor_ebr_db: tuple[float, float] = (-5.0, 15.0)
    max_peak_db: float = -6.0
    max_attempts: int = 50
    # The world around the targets (used when world pools are given).
    background_db: tuple[float, float] = (-60.0, -40.0)  # B: the everyday-sound bed's level
    ambience_bed_p: float = 0.7
    ambience_per_minute: float = 6.0
    ambience_ebr_db: tuple[float, float] = (-5.0, 15.0)
    speech_per_minute: float = 6.0
    speech_ebr_db: tuple[float, float] = (0.0, 20.0)
    speech_max_s: float = 8.0
    music_p: float = 0.3
    music_ebr_db: tuple[float, float] = (-5.0, 10.0)
    music_cover: tuple[float, float] = (0.3, 1.0)
    world_excerpt_s: float = 10.0  # longest piece of one world file in a bed loop
    # Level changes of the whole scene.
    scene_gain_db: tuple[float, float] = (-10.0, 10.0)
    ramp_p: float = 0.2
    ramp_db: tuple[float, float] = (-20.0, 20.0)
    silence_p: float = 0.1
    silence_s: tuple[float, float] = (0.5, 4.0)
    augment: AugmentConfig | None = None

    def __post_init__(self) -> None:
        from train.augment import AugmentConfig

        for name in ("events_per_minute_range", "event_db", "ebr_db", "distractor_db", "distractor_ebr_db",
                     "background_db", "ambience_ebr_db", "speech_ebr_db", "music_ebr_db", "music_cover",
                     "scene_gain_db", "ramp_db", "silence_s"):
            object.__setattr__(self, name, _pair(getattr(self, name)))
        if isinstance(self.augment, dict):
            object.__setattr__(self, "augment", AugmentConfig.from_dict(self.augment))
        ranges = [getattr(self, f.name) for f in dataclasses.fields(self)
                  if isinstance(getattr(self, f.name), tuple) and f.name.endswith(("_db", "_s", "_cover"))]
        checks = [
            (self.scene_s > 0, "scene_s must be > 0"),
            (self.sample_rate_hz > 0, "sample_rate_hz must be > 0"),
            (self.max_polyphony >= 1, "max_polyphony must be >= 1"),
            (all(r[0] <= r[1] for r in ranges), "level and length ranges must be (low, high)"),
            (self.label_db > 0 and self.min_gap_s >= 0, "label_db must be > 0 and min_gap_s >= 0"),
            (self.noise in ("none", "white", "pink", "brown"), "noise must be none, white, pink or brown"),
            (self.events_per_minute_range is None or self.events_per_minute_range[0] >= 0,
             "events_per_minute_range must be >= 0"),
            (min(self.events_per_minute, self.distractors_per_minute, self.ambience_per_minute,
                 self.speech_per_minute) >= 0, "rates must be >= 0"),
            (all(0 <= p <= 1 for p in (self.ambience_bed_p, self.music_p, self.ramp_p, self.silence_p)),
             "probabilities must be in [0, 1]"),
            (0 < self.music_cover[0] <= self.music_cover[1] <= 1, "music_cover must lie in (0, 1]"),
            (self.speech_max_s > 0 and self.world_excerpt_s > 0, "speech_max_s and world_excerpt_s must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise MixError(f"{type(self).__name__}: {message}")

    @property
    def n_samples(self) -> int:
        return round(self.scene_s * self.sample_rate_hz)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MixError(f"{cls.__name__}: unknown field(s) {unknown}")
        return cls(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                      for k, v in d.items()})

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


class Store(Protocol):
    def get(self, clip: Clip) -> tuple[np.ndarray, list[tuple[int, int]]]: ...

    def piece(self, clip: Clip, rng: np.random.Generator, max_len: int) -> np.ndarray: ...


@dataclass
class ScenePools:
    """What one split's scenes draw from. ``world`` maps a category (speech, music, ambience) to
    its clips; ``labelled`` names the world categories that are classes."""

    events: dict[str, list[Clip]]
    beds: dict[str, list[Clip]] = field(default_factory=dict)
    distractors: list[Clip] = field(default_factory=list)
    world: dict[str, list[Clip]] = field(default_factory=dict)
    labelled: tuple[str, ...] = ()


@dataclass
class Scene:
    """A mixed scene: audio (n,) float64, labelled [(label, a, b)] in samples, [(clip, role)]."""

    audio: np.ndarray
    labelled: list[tuple[str, int, int]]
    used: list[tuple[Clip, str]]
    dropped: int
    scale: float
    levels: dict[str, float] = field(default_factory=dict)


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


def excerpt_start(rng: np.random.Generator, n: int, max_len: int) -> int:
    """Where a piece of at most max_len samples of an n-sample clip starts (0 when it fits: no draw).
    Both stores (train.pools) cut world clips with it, so files and on-the-fly scenes agree."""
    return int(rng.integers(0, n - max_len + 1)) if n > max_len else 0


def _loop(rng: np.random.Generator, choices: list[Clip], n: int, store: Store, used: list, role: str,
          excerpt: int | None = None) -> np.ndarray:
    """Random clips of ``choices`` one after another with 50 ms cross-fades, n samples long."""
    bed, pos, fade = np.zeros(n), 0, round(0.05 * getattr(store, "rate", 16000))
    while pos < n:
        clip = choices[int(rng.integers(len(choices)))]
        x = store.piece(clip, rng, excerpt) if excerpt else store.get(clip)[0].copy()
        k = min(fade, len(x) // 2)
        ramp = np.linspace(0.0, 1.0, k, endpoint=False)
        x[:k] *= ramp
        x[len(x) - k:] *= ramp[::-1]
        start = max(pos - k, 0)
        end = min(start + len(x), n)
        bed[start:end] += x[: end - start]
        pos = start + len(x)
        used.append((clip, role))
    return bed


def _cut(labelled: list[tuple[str, int, int]], a: int, b: int) -> list[tuple[str, int, int]]:
    """Labelled segments with the samples [a, b) removed (a segment may split in two)."""
    out = []
    for label, s, e in labelled:
        for lo, hi in ((s, min(e, a)), (max(s, b), e)):
            if lo < hi:
                out.append((label, lo, hi))
    return out


def mix_scene(rng: np.random.Generator, cfg: MixConfig, store: Store, pools: ScenePools,
              augmenter=None) -> Scene:
    """One scene (see the module docstring). ``augmenter`` (train.augment.WaveAugmenter) changes
    each event and utterance before it is placed, and the whole mix at the end."""
    n, rate = cfg.n_samples, cfg.sample_rate_hz
    mix = np.zeros(n)
    used: list[tuple[Clip, str]] = []
    levels: dict[str, float] = {}
    world = {k: v for k, v in pools.world.items() if v}
    relative = cfg.ebr_db is not None or bool(world)
    background = float(rng.uniform(*cfg.background_db)) if relative else 0.0
    if relative:
        levels["background_db"] = background

    def prepared(clip: Clip, excerpt_s: float | None = None) -> tuple[np.ndarray, list[tuple[int, int]]]:
        if excerpt_s is None:
            x, segments = store.get(clip)
            if augmenter is None:
                return x, segments
        else:
            x = store.piece(clip, rng, round(excerpt_s * rate))
        if augmenter is not None:
            x = augmenter.event(x, rng)
        return x, audible_segments(x, rate, cfg.label_db, cfg.min_gap_s)

    if cfg.noise != "none":
        noise = _noise(rng, n, cfg.noise)
        mix += _at_level(noise, cfg.noise_db, float(np.sqrt(np.mean(noise**2))))
    if pools.beds:
        names = sorted(pools.beds)
        bed = _loop(rng, pools.beds[names[int(rng.integers(len(names)))]], n, store, used, "bed")
        mix += _at_level(bed, cfg.bed_db, float(np.sqrt(np.mean(bed**2))))
    if "ambience" in world and rng.random() < cfg.ambience_bed_p:
        bed = _loop(rng, world["ambience"], n, store, used, "ambience bed", round(cfg.world_excerpt_s * rate))
        if np.any(bed):
            mix += _at_level(bed, background, float(np.sqrt(np.mean(bed**2))))

    placed: list[tuple[str, int, int]] = []
    if "music" in world and rng.random() < cfg.music_p:
        length = max(1, round(rng.uniform(*cfg.music_cover) * n))
        start = int(rng.integers(0, n - length + 1))
        music = _loop(rng, world["music"], length, store, used, "music", round(cfg.world_excerpt_s * rate))
        fade = min(round(0.5 * rate), length // 4)  # a bed fades in and out; its label spans it all
        if fade:
            music[:fade] *= np.linspace(0.0, 1.0, fade, endpoint=False)
            music[length - fade:] *= np.linspace(1.0, 0.0, fade, endpoint=False)
        if np.any(music):
            level = background + rng.uniform(*cfg.music_ebr_db)
            mix[start:start + length] += _at_level(music, level, float(np.sqrt(np.mean(music**2))), cfg.max_peak_db)
            if "music" in pools.labelled:
                placed.append(("music", start, start + length))

    def place(label: str, x: np.ndarray, segments: list[tuple[int, int]], level: float, labelled: bool) -> bool:
        length = min(len(x), n)
        for _attempt in range(cfg.max_attempts):
            start = int(rng.integers(0, n - length + 1))
            new = [(start + a, start + min(b, length)) for a, b in segments if a < length]
            if not labelled or _fits(new, label, [p for p in placed if p[0] != "music"], cfg.max_polyphony):
                break
        else:
            return False
        mix[start:start + length] += _at_level(x[:length], level, _rms(x, segments), cfg.max_peak_db)
        if labelled:
            placed.extend((label, a, b) for a, b in new)
        return True

    classes, dropped = sorted(pools.events), 0
    rate_per_minute = cfg.events_per_minute
    if cfg.events_per_minute_range is not None:
        rate_per_minute = float(rng.uniform(*cfg.events_per_minute_range))
        levels["events_per_minute"] = rate_per_minute
    for _ in range(round(rate_per_minute * cfg.scene_s / 60)):
        label = classes[int(rng.integers(len(classes)))]
        clip = pools.events[label][int(rng.integers(len(pools.events[label])))]
        x, segments = prepared(clip)
        if not segments:
            dropped += 1
            continue
        length = min(len(x), n)
        for _attempt in range(cfg.max_attempts):  # onset first, then the level: the old draw order
            start = int(rng.integers(0, n - length + 1))
            new = [(start + a, start + min(b, length)) for a, b in segments if a < length]
            if _fits(new, label, [p for p in placed if p[0] != "music"], cfg.max_polyphony):
                break
        else:
            dropped += 1
            continue
        level = background + rng.uniform(*cfg.ebr_db) if cfg.ebr_db is not None else rng.uniform(*cfg.event_db)
        mix[start:start + length] += _at_level(x[:length], level, _rms(x, segments), cfg.max_peak_db)
        placed += [(label, a, b) for a, b in new]
        used.append((clip, "event"))

    if "speech" in world:
        for _ in range(int(rng.poisson(cfg.speech_per_minute * cfg.scene_s / 60))):
            clip = world["speech"][int(rng.integers(len(world["speech"])))]
            x, segments = prepared(clip, cfg.speech_max_s)
            if not segments:
                continue
            level = background + rng.uniform(*cfg.speech_ebr_db)
            if place("speech", x, segments, level, "speech" in pools.labelled):
                used.append((clip, "speech"))
            else:
                dropped += 1

    if pools.distractors:
        for _ in range(round(cfg.distractors_per_minute * cfg.scene_s / 60)):
            clip = pools.distractors[int(rng.integers(len(pools.distractors)))]
            x, segments = store.get(clip)
            length = min(len(x), n)
            start = int(rng.integers(0, n - length + 1))
            level = (background + rng.uniform(*cfg.distractor_ebr_db) if cfg.ebr_db is not None
                     else rng.uniform(*cfg.distractor_db))
            mix[start:start + length] += _at_level(x[:length], level, _rms(x, segments), cfg.max_peak_db)
            used.append((clip, "distractor"))
    if "ambience" in world:
        for _ in range(int(rng.poisson(cfg.ambience_per_minute * cfg.scene_s / 60))):
            clip = world["ambience"][int(rng.integers(len(world["ambience"])))]
            x = store.piece(clip, rng, round(cfg.world_excerpt_s * rate))
            segments = audible_segments(x, rate, cfg.label_db, cfg.min_gap_s)
            if segments:
                place("ambience", x, segments, background + rng.uniform(*cfg.ambience_ebr_db), False)
                used.append((clip, "ambience"))

    if augmenter is not None:  # microphone and room noise: before the level changes and silences
        mix = augmenter.scene(mix, rng)
    # Level changes of the whole scene (quiet room to loud); each draws only when enabled.
    if cfg.scene_gain_db != (0.0, 0.0):
        gain_db = float(rng.uniform(*cfg.scene_gain_db))
        levels["scene_gain_db"] = gain_db
        mix *= 10 ** (gain_db / 20)
    if cfg.ramp_p > 0 and rng.random() < cfg.ramp_p:
        t0, t1 = np.sort(rng.integers(0, n + 1, size=2))
        ramp_db = float(rng.uniform(*cfg.ramp_db))
        envelope = np.zeros(n)
        envelope[t0:t1] = np.linspace(0.0, ramp_db, t1 - t0, endpoint=False)
        envelope[t1:] = ramp_db
        mix *= 10 ** (envelope / 20)
        levels["ramp_db"] = ramp_db
    if cfg.silence_p > 0 and rng.random() < cfg.silence_p:
        length = min(n, round(rng.uniform(*cfg.silence_s) * rate))
        start = int(rng.integers(0, n - length + 1))
        mix[start:start + length] = 0.0  # digital silence: a muted or dropped input; nothing sounds
        placed = _cut(placed, start, start + length)
        levels["silence_s"] = length / rate

    peak = float(np.max(np.abs(mix))) if n else 0.0
    scale = 0.99 / peak if peak > 0.99 else 1.0
    return Scene(mix * scale if scale != 1.0 else mix, placed, used, dropped, scale, levels)
