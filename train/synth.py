"""Scene synthesis: long polyphonic scenes with strong labels, mixed from isolated clips.

In the spirit of TUT-SED Synthetic 2016: isolated event clips are placed at random times with
random gains, at most ``max_polyphony`` labelled events sounding at once; optional beds (a noise
bed and/or looped clips of chosen classes) and unlabelled distractor clips from a second pool.
Run ``python -m train.synth --help``; output::

    <out>/<split>/audio/<split>_<index>.wav    mono, sample_rate_hz, PCM_16 or FLOAT
    <out>/<split>/annotations.tsv              DCASE TSV (scenes without events listed by empty rows)
    <out>/manifest.json                        parameters, seed, labels, every source clip used
                                               with its licence/author/URL for attribution

Choices (the mixing itself is train.mixing's, shared with on-the-fly training; pools are train.pools'):

- **Pools**: a folder with ``meta.csv`` (``filename`` relative to the folder, ``class``, and
  optionally ``fold``, ``source_clip_id``, ``clip_license``, ``freesound_author``, ``freesound_url``,
  ``source_dataset``), or one sub-folder per class. Without a fold, ESC-style names
  ``<fold>-<id>-<take>`` give it; otherwise a CRC32 of the recording id picks one.
- **Splits by fold** (default train 1-2, validate 3, test 4): a clip's recording (its Freesound
  sound id where known) may feed one split only; this is checked, not assumed.
- **Labels follow the audible extent** (train.mixing): frames within ``label_db`` (30 dB, the same
  rule as the pools' core_start_s / core_end_s) of the clip's loudest 20 ms frame, gaps under
  ``min_gap_s`` merged. Masking by beds, noise or other events is not modelled, as in TUT-SED 2016.
- **Gains**: each event's RMS over its labelled samples is set to a level drawn uniformly from
  ``event_db`` dBFS (or, with ``ebr_db``, relative to the scene's background level), but no clip
  may peak above ``max_peak_db``; if the final mix still peaks above 0.99 the whole scene is
  scaled down (recorded as ``scale``; labels are unaffected).
- **Polyphony** counts labelled events only; two events of one class never overlap. An event that
  finds no admissible onset in ``max_attempts`` tries is dropped (counted in the manifest).
- **Beds**: bed classes come from the event pool and are removed from the labelled classes, so a
  labelled class never sounds unlabelled. **Distractors**: the distractor pool's categories, sorted
  by name, are halved: the first half feeds train scenes, the second validation and test scenes.
- **World** (``--world POOL``, repeatable): speech, music and everyday sound under and between the
  events; speech and music become classes (speech by its audible extent, music over its whole
  placed span). Train scenes hear the pool's training groups, validation scenes the groups
  train.pools.split_world holds out (disjoint speakers, albums, packages), test scenes only
  ``--test-world`` pools (e.g. ../shared/data/negatives-test for the "over speech and music"
  condition). ``--mix default`` turns on on-the-fly training's level changes and EBR levels,
  ``--set augment={}`` its waveform augmentation, so validation scenes can sound like training's.
- **Reproducible**: scene k of split s draws from ``default_rng([seed, s, k])``; same inputs and
  seed give identical bytes (the float WAV PEAK chunk, which holds a timestamp, is disabled).
  With the world and level-change options off, the audio is byte for byte that of earlier versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from train.annotations import Event, write_dcase_tsv
from train.datasets import SPLITS
from train.mixing import (  # noqa: F401  (re-exported: the names train.synth has always had)
    ENVELOPE_FRAME_S, LABELLED_WORLD, Clip, MixConfig, MixError, ScenePools, audible_segments, mix_scene,
)
from train.pools import ClipCache, filter_licenses, load_pool, load_world, split_world  # noqa: F401

SynthError = MixError  # inputs that cannot make the requested scenes


@dataclass(frozen=True, kw_only=True)
class SynthConfig(MixConfig):
    """Every parameter of a synthesis run (recorded in manifest.json). The mixing fields are
    train.mixing.MixConfig's, with the defaults of scene files written before world pools and
    level changes existed (those are off unless asked for)."""

    pool: str
    distractors: str | None = None
    seed: int = 0
    subtype: str = "PCM_16"
    scenes: tuple[int, int, int] = (30, 10, 10)  # train, validate, test
    folds: tuple[tuple[int, ...], ...] = ((1, 2), (3,), (4,))
    classes: tuple[str, ...] | None = None  # None: every pool class that is not a bed class
    licenses: tuple[str, ...] | None = None
    bed_classes: tuple[str, ...] = ()
    world: tuple[str, ...] = ()  # world pools: train scenes hear their training groups, validate the held-out ones
    test_world: tuple[str, ...] = ()  # world pools for the test scenes (e.g. negatives-test); none: no world there
    world_held_out: float = 0.2  # fraction of each category's groups held out for validation scenes
    world_classes: tuple[str, ...] = LABELLED_WORLD  # world categories that become classes
    # MixConfig fields with the defaults of the files written before on-the-fly mixing:
    scene_s: float = 60.0
    events_per_minute_range: tuple[float, float] | None = None
    noise: str = "none"
    noise_db: float = -65.0
    ebr_db: tuple[float, float] | None = None
    scene_gain_db: tuple[float, float] = (0.0, 0.0)
    ramp_p: float = 0.0
    silence_p: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.subtype in ("PCM_16", "FLOAT"), "subtype must be PCM_16 or FLOAT"),
            (len(self.scenes) == len(SPLITS) and min(self.scenes) >= 0 and sum(self.scenes) > 0,
             f"scenes must give {len(SPLITS)} counts >= 0 ({', '.join(SPLITS)}), not all zero"),
            (len(self.folds) == len(SPLITS), f"folds must give one tuple per split {SPLITS}"),
            (set(self.world_classes) <= set(LABELLED_WORLD), f"world_classes must be among {LABELLED_WORLD}"),
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

    def mix(self) -> MixConfig:
        """The mixing part alone (what on-the-fly training records for the same scenes)."""
        names = {f.name for f in dataclasses.fields(MixConfig)}
        return MixConfig(**{k: getattr(self, k) for k in names})


def _write_wav(path: Path, x: np.ndarray, rate: int, subtype: str) -> None:
    with sf.SoundFile(str(path), "w", rate, 1, subtype=subtype, format="WAV") as f:
        if subtype == "FLOAT":
            # libsndfile's PEAK chunk carries a timestamp; SFC_SET_ADD_PEAK_CHUNK (0x1050) off
            # keeps same-seed output byte-identical.
            sf._snd.sf_command(f._file, 0x1050, sf._ffi.NULL, 0)
        f.write(x.astype(np.float32))


def split_pools(cfg, scenes: tuple[int, int, int] = (1, 1, 1)):
    """Per split, what its scenes draw from; checks every rule. ``cfg`` needs the source fields of
    SynthConfig (pool, distractors, folds, classes, licenses, bed_classes, world, test_world,
    world_held_out, world_classes); ``scenes`` says which splits must be complete.

    Returns (labels, distractor halves, {split: ScenePools}, world groups {split: [group, ...]}).
    Labels are the event classes (sorted), then the world classes that some world pool holds.
    The licence filter applies to event and distractor clips; world pools carry their own
    licences (recorded in the manifest) and are not filtered."""
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
    world_train, world_held = split_world(load_world(cfg.world), cfg.world_held_out) if cfg.world else ([], [])
    world_test = load_world(cfg.test_world) if cfg.test_world else []
    world_by_split = {"train": world_train, "validate": world_held, "test": world_test}
    present = {c.label for c in world_train + world_held + world_test}
    world_labels = [c for c in LABELLED_WORLD if c in cfg.world_classes and c in present]
    clash = sorted(set(world_labels) & set(pool_classes))
    if clash:
        raise SynthError(f"world classes {clash} are also event-pool classes")
    labels += world_labels
    out, problems = {}, []
    for i, split in enumerate(SPLITS):
        folds = set(cfg.folds[i])
        in_split = [c for c in clips if c.fold in folds]
        pool = {label: [c for c in in_split if c.label == label] for label in labels if label not in world_labels}
        beds = {label: [c for c in in_split if c.label == label] for label in cfg.bed_classes}
        half = set(halves[0 if i == 0 else 1])
        dis = [c for c in d_clips if c.label in half]
        world = {cat: [c for c in world_by_split[split] if c.label == cat] for cat in ("speech", "music", "ambience")}
        if scenes[i]:
            problems += [f"split {split} (folds {sorted(folds)}): no {'bed ' if label in beds else ''}clip "
                         f"of class {label!r} after the licence filter"
                         for label, cs in {**pool, **beds}.items() if not cs]
            if cfg.distractors and not dis:
                problems.append(f"split {split}: no distractor clip in categories {sorted(half)}")
        out[split] = ScenePools(pool, beds, dis, {k: v for k, v in world.items() if v}, tuple(world_labels))
    if problems:
        raise SynthError("cannot synthesise:\n  " + "\n  ".join(problems))
    # No recording may feed two splits (events and beds), nor train and the other splits
    # (distractors, world groups).
    owner: dict[str, str] = {}
    for split, p in out.items():
        for c in [c for cs in list(p.events.values()) + list(p.beds.values()) for c in cs]:
            if owner.setdefault(c.recording_id, split) != split:
                raise SynthError(f"recording {c.recording_id} ({c.filename}) is in folds of both "
                                 f"{owner[c.recording_id]} and {split}")
    train_d = {c.recording_id for c in out["train"].distractors}
    train_w = {c.recording_id for c in world_train}
    for split in SPLITS[1:]:
        both = train_d & {c.recording_id for c in out[split].distractors}
        if both:
            raise SynthError(f"distractor recordings {sorted(both)[:5]} feed train and {split}")
        both = train_w & {c.recording_id for c in world_by_split[split]}
        if both:
            raise SynthError(f"world groups {sorted(both)[:5]} feed train and {split}")
    groups = {split: sorted({c.recording_id for c in w}) for split, w in world_by_split.items()}
    return labels, halves, out, groups


def synthesize(cfg: SynthConfig, out_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the scenes of every split with scenes > 0 and manifest.json under out_dir; return the manifest."""
    out_dir = Path(out_dir)
    labels, halves, pools, groups = split_pools(cfg, cfg.scenes)
    for split in SPLITS:
        audio_dir = out_dir / split / "audio"
        stale = sorted(audio_dir.glob("*.wav")) if audio_dir.is_dir() else []
        if stale and not overwrite:
            raise SynthError(f"{audio_dir}: already holds {len(stale)} WAV files; pass overwrite=True (--overwrite)")
        for p in stale:
            p.unlink()
    cache = ClipCache(cfg.sample_rate_hz, cfg.label_db, cfg.min_gap_s)
    augmenter = None
    if cfg.augment is not None:
        from train.augment import WaveAugmenter

        augmenter = WaveAugmenter(cfg.augment, cfg.sample_rate_hz)
    manifest: dict[str, Any] = {"format": "rtsed-synth/1", "config": cfg.to_dict(), "labels": labels,
                                "distractor_categories": {"train": halves[0], "validate+test": halves[1]},
                                "splits": {}}
    if cfg.world or cfg.test_world:
        manifest["world_groups"] = groups
    for i, split in enumerate(SPLITS):
        if not cfg.scenes[i]:
            continue
        (out_dir / split / "audio").mkdir(parents=True, exist_ok=True)
        events, names, scenes, uses = [], [], [], {}
        for k in range(cfg.scenes[i]):
            rng = np.random.default_rng([cfg.seed, i, k])
            scene = mix_scene(rng, cfg, cache, pools[split], augmenter)
            name = f"{split}_{k:04d}.wav"
            _write_wav(out_dir / split / "audio" / name, scene.audio, cfg.sample_rate_hz, cfg.subtype)
            events += [Event(name, a / cfg.sample_rate_hz, b / cfg.sample_rate_hz, label)
                       for label, a, b in scene.labelled]
            names.append(name)
            scenes.append({"file": name, "events": len(scene.labelled), "dropped_events": scene.dropped,
                           "scale": scene.scale, **({"levels": scene.levels} if scene.levels else {})})
            for clip, role in scene.used:
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


def parse_assignments(items: list[str], prefix: str = "") -> dict[str, Any]:
    """``FIELD=VALUE`` strings (``PREFIX.FIELD=VALUE`` when prefix is given; others are skipped)
    -> {field: value}, the value parsed as JSON where it parses (lists become tuples)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SynthError(f"--set {item!r}: write FIELD=VALUE")
        if prefix:
            if not key.startswith(prefix + "."):
                continue
            key = key[len(prefix) + 1:]
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        out[key] = value
    return out


def with_mix_options(cfg: SynthConfig, mix: str | None, assignments: list[str]) -> SynthConfig:
    """cfg with the MixConfig fields of ``mix`` ('default' or a JSON file) and then ``assignments``."""
    changes: dict[str, Any] = {}
    if mix == "default":
        changes = MixConfig().to_dict()
    elif mix:
        changes = json.loads(Path(mix).read_text(encoding="utf-8"))
    changes = {k: v for k, v in changes.items() if k not in ("scene_s", "sample_rate_hz")}
    changes.update(parse_assignments(assignments))
    if not changes:
        return cfg
    fields = {f.name for f in dataclasses.fields(SynthConfig)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise SynthError(f"unknown config field(s) {unknown}")
    if isinstance(changes.get("augment"), dict):
        from train.augment import AugmentConfig

        changes["augment"] = AugmentConfig.from_dict(changes["augment"])
    return dataclasses.replace(cfg, **changes)


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
    p.add_argument("--world", action="append", default=[], metavar="DIR",
                   help="world pool (meta.csv with category speech/music/ambience and group), repeatable: "
                        "train scenes hear its training groups, validation scenes its held-out groups")
    p.add_argument("--test-world", action="append", default=[], metavar="DIR",
                   help="world pool for the test scenes only (e.g. ../shared/data/negatives-test)")
    p.add_argument("--world-held-out", type=float, default=d["world_held_out"],
                   help="fraction of each world category's groups held out for validation scenes")
    p.add_argument("--mix", metavar="JSON|default",
                   help="mixing fields (train.mixing.MixConfig) from a JSON file, or 'default' for on-the-fly "
                        "training's defaults; scene length and rate stay the flags'. Applied after the flags")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any config field, value as JSON, applied last, e.g. --set ebr_db=[0,20] --set augment={}")
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
        world=tuple(a.world), test_world=tuple(a.test_world), world_held_out=a.world_held_out,
    )
    try:
        cfg = with_mix_options(cfg, a.mix, a.set)
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
