"""Strong labels: the event-list type, its file formats and its frame targets.

An :class:`Event` is one labelled sound: ``[onset_s, offset_s)`` in seconds from the file's first
sample, in the file named ``filename``. Two on-disk formats:

- **DCASE TSV** (DESED, DCASE 2017+ and ``rtsed.detect``): tab separated with the header
  ``filename<TAB>onset<TAB>offset<TAB>event_label``; extra columns (e.g. ``score``) are ignored on
  read, column order follows the header. A row whose onset, offset and label are all empty lists a
  file that has no events (an all-negative file), as DESED does.
- **TUT-SED 2016** annotation files: one event per line, ``onset_s offset_s label`` separated by
  whitespace; the file name is implied by the annotation file.

Frame targets follow the frame-time convention of docs/conventions.md: frame t's label cell is
``[t*hop_s, (t+1)*hop_s)`` and an event activates every cell it overlaps.

Every reader validates and raises :class:`AnnotationError` naming the file and line.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DCASE_COLUMNS = ("filename", "onset", "offset", "event_label")

# Times are snapped to a cell boundary when they lie this close to it (in cells), so that float
# error in onset/hop (0.06 / 0.02 = 2.9999999999999996) cannot move an event into a neighbour cell.
_BOUNDARY_EPS_CELLS = 1e-6


class AnnotationError(ValueError):
    """Malformed or inconsistent annotations; the message names the file (and line when known)."""


@dataclass(frozen=True)
class Event:
    """One strongly labelled sound event: ``[onset_s, offset_s)`` in seconds within ``filename``."""

    filename: str
    onset_s: float
    offset_s: float
    event_label: str

    @property
    def duration_s(self) -> float:
        return self.offset_s - self.onset_s


def _where(source: str | Path, line: int | None) -> str:
    return f"{source}, line {line}" if line is not None else str(source)


def validate_event(
    event: Event,
    source: str | Path,
    line: int | None = None,
    *,
    duration_s: float | None = None,
    labels: Sequence[str] | None = None,
    offset_tolerance_s: float = math.inf,
) -> None:
    """Raise AnnotationError (naming ``source`` and ``line``) if ``event`` is not a valid event.

    Checks: finite times, onset >= 0, offset > onset; with ``duration_s``: onset < duration_s and
    offset <= duration_s + offset_tolerance_s (a file's last event may end a little past its last
    sample through rounding; the tolerance says how much is accepted); with ``labels``: the label
    is one of them.
    """
    where = _where(source, line)
    on, off = event.onset_s, event.offset_s
    if not (math.isfinite(on) and math.isfinite(off)):
        raise AnnotationError(f"{where}: onset/offset must be finite numbers, got {on!r}, {off!r}")
    if on < 0:
        raise AnnotationError(f"{where}: negative onset {on} s in {event.filename!r}")
    if off <= on:
        raise AnnotationError(
            f"{where}: offset {off} s is not after onset {on} s ({event.event_label!r} in {event.filename!r})"
        )
    if duration_s is not None:
        if on >= duration_s:
            raise AnnotationError(
                f"{where}: onset {on} s of {event.event_label!r} lies beyond the end of "
                f"{event.filename!r} ({duration_s:.3f} s long)"
            )
        if off > duration_s + offset_tolerance_s:
            raise AnnotationError(
                f"{where}: offset {off} s of {event.event_label!r} lies beyond the end of "
                f"{event.filename!r} ({duration_s:.3f} s long, tolerance {offset_tolerance_s} s)"
            )
    if labels is not None and event.event_label not in labels:
        raise AnnotationError(
            f"{where}: unknown label {event.event_label!r}; known labels are {sorted(labels)}"
        )


def _parse_time(text: str, what: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise AnnotationError(f"{where}: {what} {text!r} is not a number") from None
    return value


# --------------------------------------------------------------------------------------- DCASE TSV
def read_dcase_tsv_by_file(
    path: str | Path,
    labels: Sequence[str] | None = None,
    durations_s: Mapping[str, float] | None = None,
    offset_tolerance_s: float = math.inf,
) -> dict[str, list[Event]]:
    """Read a DCASE TSV into ``{filename: [Event, ...]}`` in file order.

    Files listed only by an empty row (no onset, offset, label) map to an empty list. With
    ``durations_s`` every event is checked against its file's duration (a filename missing from
    the mapping is an error); see :func:`validate_event` for all checks.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read annotations ({e.strerror or e})") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise AnnotationError(f"{path}: empty file; expected the header {chr(9).join(DCASE_COLUMNS)!r}")
    header = [h.strip() for h in lines[0].split("\t")]
    missing = [c for c in DCASE_COLUMNS if c not in header]
    if missing:
        raise AnnotationError(
            f"{path}, line 1: header {header} lacks column(s) {missing}; a DCASE TSV is tab separated "
            f"and starts with {chr(9).join(DCASE_COLUMNS)!r}"
        )
    col = {c: header.index(c) for c in DCASE_COLUMNS}
    out: dict[str, list[Event]] = {}
    for row_no, fields in enumerate(csv.reader(lines[1:], delimiter="\t", quoting=csv.QUOTE_NONE), 2):
        if not fields or all(not f.strip() for f in fields):
            continue  # blank line
        where = _where(path, row_no)
        if len(fields) < len(header):
            # A lone filename (no tabs, no spaces) lists a file without events; anything else
            # short is most likely space-separated and must not be read as an empty row.
            if len(fields) == 1 and len(fields[0].split()) == 1:
                fields = fields + [""] * (len(header) - 1)
            else:
                raise AnnotationError(
                    f"{where}: expected {len(header)} tab-separated fields ({', '.join(header)}), "
                    f"got {len(fields)}: {chr(9).join(fields)!r}"
                )
        name, on, off, label = (fields[col[c]].strip() for c in DCASE_COLUMNS)
        if not name:
            raise AnnotationError(f"{where}: empty filename")
        events = out.setdefault(name, [])
        if not on and not off and not label:
            continue  # a listed file without events
        if not (on and off and label):
            raise AnnotationError(
                f"{where}: onset, offset and event_label must all be given or all be empty, "
                f"got {on!r}, {off!r}, {label!r}"
            )
        event = Event(name, _parse_time(on, "onset", where), _parse_time(off, "offset", where), label)
        duration = None
        if durations_s is not None:
            if name not in durations_s:
                raise AnnotationError(f"{where}: no audio file {name!r} for this annotation")
            duration = durations_s[name]
        validate_event(event, path, row_no, duration_s=duration, labels=labels,
                       offset_tolerance_s=offset_tolerance_s)
        events.append(event)
    return out


def read_dcase_tsv(
    path: str | Path,
    labels: Sequence[str] | None = None,
    durations_s: Mapping[str, float] | None = None,
    offset_tolerance_s: float = math.inf,
) -> list[Event]:
    """Read every event of a DCASE TSV (file order). See :func:`read_dcase_tsv_by_file`."""
    by_file = read_dcase_tsv_by_file(path, labels, durations_s, offset_tolerance_s)
    return [e for events in by_file.values() for e in events]


def format_time(seconds: float) -> str:
    """Seconds as text with microsecond resolution and no trailing zeros ("1.5", "0.02", "3")."""
    text = f"{seconds:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def write_dcase_tsv(
    path: str | Path, events: Iterable[Event], files_without_events: Iterable[str] = ()
) -> None:
    """Write events as a DCASE TSV, sorted by (filename, onset, offset, label) so that equal event
    sets give identical bytes; each of ``files_without_events`` gets an empty row."""
    rows = sorted(events, key=lambda e: (e.filename, e.onset_s, e.offset_s, e.event_label))
    with_events = {e.filename for e in rows}
    empties = sorted(set(files_without_events) - with_events)
    for e in rows:
        if "\t" in e.filename or "\t" in e.event_label or "\n" in e.filename + e.event_label:
            raise AnnotationError(f"{path}: tab or newline in {e.filename!r} / {e.event_label!r}")
    lines = ["\t".join(DCASE_COLUMNS)]
    lines += [f"{e.filename}\t{format_time(e.onset_s)}\t{format_time(e.offset_s)}\t{e.event_label}" for e in rows]
    lines += [f"{name}\t\t\t" for name in empties]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------- TUT-SED 2016
def read_tut_annotation(
    path: str | Path,
    filename: str,
    labels: Sequence[str] | None = None,
    duration_s: float | None = None,
    offset_tolerance_s: float = math.inf,
) -> list[Event]:
    """Read a TUT-SED 2016 annotation file (``onset_s offset_s label`` per line, whitespace
    separated) as events of the audio file ``filename``. Blank lines are skipped; any other line
    must have exactly three fields."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read annotations ({e.strerror or e})") from None
    events = []
    for line_no, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = _where(path, line_no)
        if len(fields) != 3:
            raise AnnotationError(
                f"{where}: expected 'onset_s offset_s label' (3 whitespace-separated fields), "
                f"got {len(fields)}: {line.strip()!r}"
            )
        event = Event(filename, _parse_time(fields[0], "onset", where),
                      _parse_time(fields[1], "offset", where), fields[2])
        validate_event(event, path, line_no, duration_s=duration_s, labels=labels,
                       offset_tolerance_s=offset_tolerance_s)
        events.append(event)
    return events


# --------------------------------------------------------------------------------- frame targets
def event_cells(onset_s: float, offset_s: float, hop_s: float) -> tuple[int, int]:
    """Label cells ``[a, b)`` that the event ``[onset_s, offset_s)`` overlaps:
    a = floor(onset/hop), b = ceil(offset/hop), with times within 1e-6 cells of a boundary snapped
    onto it (so an event ending exactly at a boundary never activates the next cell). A positive
    duration always yields at least one cell."""
    start, end = onset_s / hop_s, offset_s / hop_s
    a = math.floor(start + _BOUNDARY_EPS_CELLS)
    b = math.ceil(end - _BOUNDARY_EPS_CELLS)
    return a, max(b, a + 1)


def events_to_frame_targets(
    events: Iterable[Event], n_frames: int, hop_s: float, labels: Sequence[str]
) -> np.ndarray:
    """Frame targets (n_frames, n_classes) float32 in {0, 1}: cell t of class c is 1 when an event
    of class c overlaps ``[t*hop_s, (t+1)*hop_s)``. Columns follow ``labels``; events past the
    last frame are cut. An event whose label is not in ``labels`` raises AnnotationError."""
    if hop_s <= 0:
        raise ValueError(f"hop_s must be > 0, got {hop_s}")
    index = {label: i for i, label in enumerate(labels)}
    targets = np.zeros((n_frames, len(labels)), dtype=np.float32)
    for e in events:
        c = index.get(e.event_label)
        if c is None:
            raise AnnotationError(
                f"{e.filename}: unknown label {e.event_label!r}; known labels are {sorted(labels)}"
            )
        a, b = event_cells(e.onset_s, e.offset_s, hop_s)
        a, b = max(a, 0), min(b, n_frames)
        if a < b:
            targets[a:b, c] = 1.0
    return targets
