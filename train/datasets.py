"""Data-set descriptions: which audio files, with which events, in which split.

No audio is decoded here beyond a cheap check (``soundfile.info`` for duration and rate, and a
block read that stops at the first non-silent block); features and caching live elsewhere. Every
data set is a :class:`SedDataset`: ``labels`` (class order), ``items`` (one :class:`DataItem` per
file), ``split(name)`` / ``pairs(name)`` (the ``(audio_path, events)`` list a feature module takes),
and iteration over ``(audio_path, events, split)`` triples.

Bad input never shrinks a data set silently: every problem found (unreadable or silent audio,
annotations outside their file, unknown labels, files without annotations, empty splits) is
collected and raised as one :class:`DatasetError` that names each file.

Data sets:

- :class:`TutSed2016`: TUT-SED Synthetic 2016 as distributed (see its docstring for the split
  lists it understands).
- :class:`DcaseDataset`: one folder of audio plus a DCASE TSV (one split).
- :class:`SynthScenes`: the ``<root>/<split>/{audio/, annotations.tsv}`` tree ``train.synth`` writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from train.annotations import AnnotationError, Event, read_dcase_tsv_by_file, read_tut_annotation

SPLITS = ("train", "validate", "test")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")

# Peak below this (about -100 dBFS, under one 16-bit step) is digital silence.
SILENCE_PEAK = 1e-5
# How far past a file's end an offset may lie (rounding in annotation tools); beyond, an error.
OFFSET_TOLERANCE_S = 1.0
_MAX_LISTED_PROBLEMS = 20


class DatasetError(ValueError):
    """A data set that cannot be used as it is; the message names every offending file."""


@dataclass(frozen=True)
class DataItem:
    """One annotated audio file. ``events`` are sorted by onset; empty means all-negative."""

    audio_path: Path
    events: tuple[Event, ...]
    split: str
    duration_s: float
    sample_rate_hz: int
    channels: int


class SedDataset:
    """A list of annotated files with split names and a class list (the model's output order)."""

    def __init__(self, name: str, items: Sequence[DataItem], labels: Sequence[str]):
        self.name = name
        self.items = tuple(items)
        self.labels = tuple(labels)
        if not self.items:
            raise DatasetError(f"{name}: no audio files")

    @property
    def splits(self) -> tuple[str, ...]:
        """Split names present, in SPLITS order first, then any others sorted."""
        present = {item.split for item in self.items}
        return tuple(s for s in SPLITS if s in present) + tuple(sorted(present - set(SPLITS)))

    def split(self, name: str) -> list[DataItem]:
        items = [item for item in self.items if item.split == name]
        if not items:
            raise DatasetError(f"{self.name}: split {name!r} is empty; splits present: {list(self.splits)}")
        return items

    def pairs(self, name: str) -> list[tuple[Path, tuple[Event, ...]]]:
        """``[(audio_path, events), ...]`` of one split: what a feature/cache module consumes."""
        return [(item.audio_path, item.events) for item in self.split(name)]

    def __iter__(self) -> Iterator[tuple[Path, tuple[Event, ...], str]]:
        for item in self.items:
            yield item.audio_path, item.events, item.split

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        """One line per split: files, events, hours of audio."""
        lines = [f"{self.name}: {len(self.labels)} classes"]
        for s in self.splits:
            items = self.split(s)
            hours = sum(i.duration_s for i in items) / 3600
            lines.append(f"  {s}: {len(items)} files, {sum(len(i.events) for i in items)} events, {hours:.2f} h")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ audio checks
def audio_info(path: Path) -> tuple[float, int, int]:
    """(duration_s, sample_rate_hz, channels) from the file header; DatasetError if unreadable/empty."""
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises RuntimeError/LibsndfileError/OSError by version
        raise DatasetError(f"{path}: cannot read audio ({e})") from None
    if info.frames <= 0:
        raise DatasetError(f"{path}: audio file has no samples")
    return info.frames / info.samplerate, int(info.samplerate), int(info.channels)


def is_silent(path: Path, block_s: float = 1.0) -> bool:
    """True when every sample is below SILENCE_PEAK. Reads block by block and stops at the first
    block with sound, so a normal file costs one block."""
    try:
        with sf.SoundFile(str(path)) as f:
            block = max(1, int(block_s * f.samplerate))
            for x in f.blocks(blocksize=block, dtype="float32", always_2d=True):
                if x.size and float(np.max(np.abs(x))) >= SILENCE_PEAK:
                    return False
    except Exception as e:
        raise DatasetError(f"{path}: cannot decode audio ({e})") from None
    return True


def _raise_problems(name: str, problems: list[str]) -> None:
    if problems:
        shown = problems[:_MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise DatasetError(f"{name}: {len(problems)} problem(s):\n  " + "\n  ".join(shown) + tail)


def _check_audio(path: Path, expected_rate_hz: int | None, check_silence: bool) -> tuple[float, int, int]:
    duration, rate, channels = audio_info(path)
    if expected_rate_hz is not None and rate != expected_rate_hz:
        raise DatasetError(f"{path}: sample rate {rate} Hz, expected {expected_rate_hz} Hz")
    if check_silence and is_silent(path):
        raise DatasetError(f"{path}: audio is silent (peak below {SILENCE_PEAK})")
    return duration, rate, channels


def _sorted_events(events: Sequence[Event]) -> tuple[Event, ...]:
    return tuple(sorted(events, key=lambda e: (e.onset_s, e.offset_s, e.event_label)))


# ------------------------------------------------------------------------------------- TUT-SED 2016
_TUT_DIR = "TUT-SED-synthetic-2016"
_TUT_AUDIO = re.compile(r"^TUT-SED-synthetic-2016-mix-(\d+)\.wav$")
_TUT_ANNOT = re.compile(r"^TUT-SED-synthetic-2016-annot-(\d+)\.txt$")
_TUT_ANY = re.compile(r"TUT-SED-synthetic-2016-(?:mix|annot)-(\d+)\.(?:wav|txt)")
# evaluation_setup list names: [<prefix>[_-.]]<role>.txt, e.g. train+validate.txt, validate.txt,
# test.txt, evaluate.txt (dcase_util's names for this set), fold1_train.txt, fold1_evaluate.txt.
_SETUP_NAME = re.compile(
    r"^(?P<prefix>.*?)[_.-]?(?P<role>train\+validate|train|validate|validation|valid|val|devel|"
    r"test|evaluate|eval)$"
)
_ROLE = {"train+validate": "trainval", "train": "train", "validate": "validate", "validation": "validate",
         "valid": "validate", "val": "validate", "devel": "validate", "test": "test",
         "evaluate": "test", "eval": "test"}


class TutSed2016(SedDataset):
    """TUT-SED Synthetic 2016 (Cakir et al. 2017), exactly as distributed.

    ``root`` is the ``TUT-SED-synthetic-2016`` folder or its parent. Layout::

        audio/TUT-SED-synthetic-2016-mix-<id>.wav      44.1 kHz, any PCM width
        meta/TUT-SED-synthetic-2016-annot-<id>.txt     onset_s offset_s label, one event per line
        evaluation_setup/*.txt                         split lists

    Split lists (assumed; the distribution's exact names could not be checked from here): text
    files named ``[<prefix>_]<role>.txt`` with role ``train``, ``train+validate``, ``validate``
    (or ``validation``/``valid``/``val``/``devel``), ``test`` or ``evaluate`` (or ``eval``).
    dcase_util names this set's lists ``train+validate.txt``, ``validate.txt``, ``test.txt`` and
    ``evaluate.txt``. Each non-blank, non-``#`` line names one mixture by its audio or annotation
    file name (any directory part, any further tab/space-separated columns such as DCASE
    ``onset offset label`` are ignored: events always come from ``meta/``); a mixture may appear on
    several lines. train = ``train`` or else ``train+validate`` minus ``validate``; test =
    ``test`` and/or ``evaluate`` (which must agree when both exist). Several prefixes (folds)
    need ``setup=<prefix>``. Every mixture must land in exactly one split.

    ``labels`` defaults to the 16 classes as spelled in the set (rtsed.config.TUT_SED_2016_LABELS).
    ``fallback_split=True`` (only when no usable lists exist): sorted by numeric id, the first 20 %
    test, the next 20 % validation, the rest train (the split seen in public code for this set).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        setup: str | None = None,
        fallback_split: bool = False,
        expected_rate_hz: int | None = 44100,
        labels: Sequence[str] | None = None,
        check_silence: bool = True,
    ):
        if labels is None:
            # Imported here: rtsed's package import pulls in torch, which listing files never needs.
            from rtsed.config import TUT_SED_2016_LABELS

            labels = TUT_SED_2016_LABELS
        root = Path(root)
        base = root if (root / "audio").is_dir() else root / _TUT_DIR
        if not ((base / "audio").is_dir() and (base / "meta").is_dir()):
            found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir()) if root.is_dir() else []
            raise DatasetError(
                f"{root}: not a TUT-SED Synthetic 2016 folder: expected audio/ and meta/ in it or in "
                f"{_TUT_DIR}/ below it; found {found[:30] or 'nothing'}"
            )
        self.root = base
        audio = {m[1]: p for p in (base / "audio").iterdir() if (m := _TUT_AUDIO.match(p.name))}
        annot = {m[1]: p for p in (base / "meta").iterdir() if (m := _TUT_ANNOT.match(p.name))}
        if not audio:
            found = sorted(p.name for p in (base / "audio").iterdir())[:10]
            raise DatasetError(f"{base / 'audio'}: no TUT-SED-synthetic-2016-mix-<id>.wav files; found {found}")
        problems = [f"{audio[i]}: no annotation file meta/TUT-SED-synthetic-2016-annot-{i}.txt"
                    for i in sorted(set(audio) - set(annot), key=int)]
        problems += [f"{annot[i]}: no audio file audio/TUT-SED-synthetic-2016-mix-{i}.wav"
                     for i in sorted(set(annot) - set(audio), key=int)]
        _raise_problems(str(base), problems)

        split_of = self._read_splits(base / "evaluation_setup", set(audio), setup, fallback_split)
        items = []
        for mix_id in sorted(audio, key=int):
            path = audio[mix_id]
            try:
                duration, rate, channels = _check_audio(path, expected_rate_hz, check_silence)
                events = read_tut_annotation(annot[mix_id], path.name, labels, duration, OFFSET_TOLERANCE_S)
            except (DatasetError, AnnotationError) as e:
                problems.append(str(e))
                continue
            items.append(DataItem(path, _sorted_events(events), split_of[mix_id], duration, rate, channels))
        _raise_problems(str(base), problems)
        super().__init__(f"TUT-SED Synthetic 2016 ({base})", items, labels)
        for s in SPLITS:
            self.split(s)  # raises on an empty split

    @staticmethod
    def _read_splits(setup_dir: Path, ids: set[str], setup: str | None, fallback: bool) -> dict[str, str]:
        """Mixture id -> split name, from the lists in ``setup_dir`` (see the class docstring)."""
        files = sorted(setup_dir.glob("*.txt")) if setup_dir.is_dir() else []
        groups: dict[str, dict[str, list[Path]]] = {}
        for f in files:
            m = _SETUP_NAME.match(f.stem.lower())
            if m:
                groups.setdefault(m["prefix"], {}).setdefault(_ROLE[m["role"]], []).append(f)

        def complete(roles: dict[str, list[Path]]) -> bool:
            return "validate" in roles and "test" in roles and ("train" in roles or "trainval" in roles)

        usable = {p: r for p, r in groups.items() if complete(r)}
        if setup is not None:
            if setup.lower() not in usable:
                raise DatasetError(
                    f"{setup_dir}: no complete set of split lists with prefix {setup!r}; complete "
                    f"prefixes: {sorted(usable)}; files: {[f.name for f in files]}"
                )
            roles = usable[setup.lower()]
        elif len(usable) == 1:
            roles = next(iter(usable.values()))
        elif len(usable) > 1:
            raise DatasetError(
                f"{setup_dir}: several sets of split lists {sorted(usable)}; choose one with setup=..."
            )
        elif fallback:
            order = sorted(ids, key=int)
            n_test = n_val = round(0.2 * len(order))
            return {i: ("test" if k < n_test else "validate" if k < n_test + n_val else "train")
                    for k, i in enumerate(order)}
        else:
            raise DatasetError(
                f"{setup_dir}: no usable split lists (need validate + test + train or train+validate, "
                f"named like validate.txt or fold1_validate.txt); files found: "
                f"{[f.name for f in files] or 'none'}. Pass fallback_split=True for a fixed 60/20/20 split by id."
            )

        lists = {role: set().union(*(_read_list(p) for p in paths)) for role, paths in roles.items()}
        if len(roles.get("test", [])) > 1 and len({frozenset(_read_list(p)) for p in roles["test"]}) > 1:
            raise DatasetError(f"{setup_dir}: test lists {[p.name for p in roles['test']]} name different mixtures")
        val, test = lists["validate"], lists["test"]
        if "train" in lists:
            train = lists["train"]
            if "trainval" in lists and lists["trainval"] != train | val:
                raise DatasetError(f"{setup_dir}: train+validate list is not the union of train and validate")
        else:
            if not val <= lists["trainval"]:
                raise DatasetError(f"{setup_dir}: validate list names mixtures not in train+validate: "
                                   f"{sorted(val - lists['trainval'], key=int)[:10]}")
            train = lists["trainval"] - val
        problems = []
        for a, b in (("train", "validate"), ("train", "test"), ("validate", "test")):
            both = {"train": train, "validate": val, "test": test}
            common = both[a] & both[b]
            if common:
                problems.append(f"mixtures in both {a} and {b}: {sorted(common, key=int)[:10]}")
        listed = train | val | test
        if listed - ids:
            problems.append(f"listed mixtures without audio: {sorted(listed - ids, key=int)[:10]}")
        if ids - listed:
            problems.append(f"mixtures in no split list: {sorted(ids - listed, key=int)[:10]}")
        _raise_problems(str(setup_dir), problems)
        return {i: "train" for i in train} | {i: "validate" for i in val} | {i: "test" for i in test}


def _read_list(path: Path) -> set[str]:
    """Mixture ids named in one split list (see TutSed2016)."""
    ids = set()
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        m = _TUT_ANY.search(fields[0])
        if m is None:
            raise DatasetError(
                f"{path}, line {line_no}: expected a TUT-SED-synthetic-2016-mix-<id>.wav (or annot-<id>.txt) "
                f"path as the first field, got {fields[0]!r}"
            )
        ids.add(m[1])
    return ids


# ------------------------------------------------------------------------------------ DCASE folders
class DcaseDataset(SedDataset):
    """One split of any DCASE-format set: ``audio_dir`` and a DCASE TSV whose ``filename`` column
    is relative to it.

    Every annotated file must exist. A file listed in the TSV by an empty row only is a valid
    all-negative file. Audio files under ``audio_dir`` that the TSV does not mention are, by
    ``unlisted``: ``"error"`` (default: a missing annotation is far more often a mistake than a
    negative), ``"negative"`` (all-negative files), or ``"skip"`` (left out; counted in
    ``self.skipped``). Labels: sorted labels found in the TSV unless ``labels`` is given (then
    every label must be in it).
    """

    def __init__(
        self,
        audio_dir: str | Path,
        annotations_tsv: str | Path,
        labels: Sequence[str] | None = None,
        *,
        split: str = "train",
        unlisted: str = "error",
        expected_rate_hz: int | None = None,
        check_silence: bool = True,
    ):
        if unlisted not in ("error", "negative", "skip"):
            raise ValueError(f"unlisted must be 'error', 'negative' or 'skip', got {unlisted!r}")
        audio_dir, annotations_tsv = Path(audio_dir), Path(annotations_tsv)
        if not audio_dir.is_dir():
            raise DatasetError(f"{audio_dir}: audio folder does not exist")
        by_file = read_dcase_tsv_by_file(annotations_tsv, labels)
        if not by_file:
            raise DatasetError(f"{annotations_tsv}: no files listed (split {split!r} would be empty)")
        on_disk = {p.relative_to(audio_dir).as_posix() for p in audio_dir.rglob("*")
                   if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()}
        problems = [f"{audio_dir / name}: annotated in {annotations_tsv} but missing"
                    for name in by_file if name not in on_disk]
        extra = sorted(on_disk - set(by_file))
        self.skipped = 0
        if extra and unlisted == "error":
            problems += [f"{audio_dir / name}: not in {annotations_tsv} (list it with an empty row if it "
                         f"has no events, or pass unlisted='negative'/'skip')" for name in extra]
        elif unlisted == "negative":
            by_file.update({name: [] for name in extra})
        else:
            self.skipped = len(extra)
        _raise_problems(str(annotations_tsv), problems)

        items = []
        for name, events in by_file.items():
            path = audio_dir / name
            try:
                duration, rate, channels = _check_audio(path, expected_rate_hz, check_silence)
                for k, e in enumerate(events):
                    if e.onset_s >= duration or e.offset_s > duration + OFFSET_TOLERANCE_S:
                        raise DatasetError(
                            f"{annotations_tsv}: event {k + 1} of {name!r} ({e.event_label}, "
                            f"{e.onset_s}-{e.offset_s} s) lies outside the file ({duration:.3f} s)"
                        )
            except DatasetError as e:
                problems.append(str(e))
                continue
            items.append(DataItem(path, _sorted_events(events), split, duration, rate, channels))
        _raise_problems(str(annotations_tsv), problems)
        found = sorted({e.event_label for events in by_file.values() for e in events})
        super().__init__(f"DCASE {annotations_tsv}", items, labels if labels is not None else found)


class SynthScenes(SedDataset):
    """Scenes written by ``python -m train.synth``: ``<root>/<split>/audio/*.wav`` and
    ``<root>/<split>/annotations.tsv`` for each split in SPLITS that exists. Labels come from
    ``labels``, else ``manifest.json``'s ``labels`` (so a class absent from one split keeps its
    column), else the sorted labels found."""

    def __init__(self, root: str | Path, labels: Sequence[str] | None = None, *, check_silence: bool = True):
        root = Path(root)
        if labels is None and (root / "manifest.json").is_file():
            labels = json.loads((root / "manifest.json").read_text(encoding="utf-8")).get("labels")
        parts = [DcaseDataset(root / s / "audio", root / s / "annotations.tsv", labels, split=s,
                              check_silence=check_silence)
                 for s in SPLITS if (root / s / "annotations.tsv").is_file()]
        if not parts:
            raise DatasetError(f"{root}: no <split>/annotations.tsv for any split in {SPLITS}")
        found = sorted({label for p in parts for label in p.labels})
        super().__init__(f"synthesised scenes ({root})", [i for p in parts for i in p.items],
                         labels if labels is not None else found)
