"""Frame probabilities -> sound events, streaming first: one decoder for live and offline use.

``EventDecoder.push(probs)`` takes frames in any chunking and returns, in decision order, an
:class:`OnsetNotice` when an event has started and a :class:`SoundEvent` when it has ended;
``flush()`` closes what is still open at the end of the stream. ``decode_offline`` is push-all +
flush. Feeding the same frames in any chunking yields exactly the same list (tests/test_decode.py):
every decision depends only on frame indices and per-frame values, and the running sums behind the
scores are accumulated in the same order whatever the chunking.

Per class, in this order (all counted in frames of ``hop_s``; frame t's cell is
[t*hop_s, (t+1)*hop_s), docs/conventions.md):

1. **Smoothing** (``smoothing_frames`` k > 1): a causal moving *median* over frames t-k+1..t.
   A median, not a mean: it deletes blips shorter than about k/2 frames and keeps clean edges
   sharp (a mean smears them into ramps whose crossing depends on the threshold). Before the
   first frame the signal is taken to repeat its first value (edge padding), so the filter
   needs no warm-up. A causal median moves a step by D = (k-1)//2 frames (exactly, for odd k), so
   reported times are shifted back by D frames (``compensate_delay=True``, the default) and
   clamped at the stream's first frame: a clean rectangular pulse is reported at its true cells.
   Odd k is recommended; an even k uses numpy's median (mean of the two middle values).
2. **Hysteresis**: an event starts at a frame with p >= on and continues while p >= off
   (off <= on); the first frame with p < off ends it.
3. **Gap merging** (``min_gap_s``): a run that starts fewer than ceil(min_gap_s/hop_s) frames
   after the previous run of the same class ended continues that event (the gap's frames belong to
   it). So an ended event is held back until the gap has lasted that long with no new onset; its
   ``SoundEvent`` is emitted then (or at ``flush()``).
4. **Minimum duration** (``min_event_s``): an event (after merging, gaps included) spanning fewer
   than ceil(min_event_s/hop_s) frames is dropped. The ``OnsetNotice`` is sent at the first
   active frame at which the event has lasted that long, so a notice is delayed by min_event_s but
   is never a false alarm of this kind: every notice is followed by exactly one ``SoundEvent``
   (at the latest at ``flush()``), and every ``SoundEvent`` was preceded by its notice.

Score: the mean of the (smoothed) probability over the event's frames [a, b), gap frames of merged
events included. A notice carries the mean over the frames seen so far.

Latency this adds on top of the model's: onsets are noticed D + ceil(min_event_s/hop_s) - 1 frames
after they happen; ends are reported D + max(1, ceil(min_gap_s/hop_s)) frames after them.

An event still open at ``flush()`` ends at the end of the last frame pushed (its cells under
smoothing delay are not yet known, so it is taken to last to the end of the stream).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

import numpy as np

from rtsed.config import ConfigError, DecoderConfig

__all__ = [
    "SoundEvent",
    "OnsetNotice",
    "EventDecoder",
    "decode_offline",
    "smoothed_scores",
    "write_dcase_tsv",
    "write_audacity_labels",
    "event_to_json",
    "DCASE_TSV_HEADER",
]

DCASE_TSV_HEADER = "filename\tonset\toffset\tevent_label\tscore"

_IDLE, _ACTIVE, _GAP = 0, 1, 2


@dataclass(frozen=True)
class SoundEvent:
    """A detected event: cells [onset_s, offset_s) of one class. Field order is fixed (docs/conventions.md)."""

    label: str
    onset_s: float
    offset_s: float
    score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OnsetNotice:
    """"An event of ``label`` started at ``onset_s`` and has lasted at least min_event_s";
    score is the mean probability over its frames so far."""

    label: str
    onset_s: float
    score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seconds_to_frames(seconds: float, hop_s: float) -> int:
    """ceil(seconds / hop_s), forgiving float noise (0.1 / 0.02 = 5.000000000000001 -> 5)."""
    x = seconds / hop_s
    r = round(x)
    return int(r) if abs(x - r) < 1e-6 else int(math.ceil(x))


def _check_threshold(label: str, name: str, value: Any) -> float:
    v = float(value)
    if not 0.0 < v < 1.0:
        raise ValueError(f"threshold override for {label!r}: {name} must lie in (0, 1), got {value!r}")
    return v


class EventDecoder:
    """Streaming per-class decoder (see the module docstring for the rules).

    labels: C class names in the model's output order; hop_s: frame step in seconds;
    config: thresholds (per class, 0.5 default), min_event_s, min_gap_s, smoothing_frames;
    overrides: {label: on} (off becomes min(off, on)) or {label: (on, off)}, applied on top of
    the config's thresholds; compensate_delay: shift reported times back by the median's delay.
    """

    def __init__(
        self,
        labels: Sequence[str],
        hop_s: float,
        config: DecoderConfig | None = None,
        overrides: Mapping[str, float | tuple[float, float]] | None = None,
        *,
        compensate_delay: bool = True,
    ) -> None:
        self.labels = tuple(str(x) for x in labels)
        if not self.labels:
            raise ValueError("EventDecoder needs at least one label")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"EventDecoder: duplicate labels in {list(self.labels)}")
        if not (isinstance(hop_s, (int, float)) and math.isfinite(hop_s) and hop_s > 0):
            raise ValueError(f"EventDecoder: hop_s must be a positive number of seconds, got {hop_s!r}")
        self.hop_s = float(hop_s)
        self.config = config if config is not None else DecoderConfig()
        n = len(self.labels)
        on, off = self.config.thresholds(n)
        on_l, off_l = list(on), list(off)
        index = {label: c for c, label in enumerate(self.labels)}
        for label, value in (overrides or {}).items():
            if label not in index:
                raise ValueError(
                    f"threshold override for unknown label {label!r}; labels are {list(self.labels)}"
                )
            c = index[label]
            if isinstance(value, (tuple, list)):
                if len(value) != 2:
                    raise ValueError(f"threshold override for {label!r}: expected on or (on, off), got {value!r}")
                a = _check_threshold(label, "on", value[0])
                b = _check_threshold(label, "off", value[1])
                if b > a:
                    raise ValueError(f"threshold override for {label!r}: off ({b}) exceeds on ({a})")
                on_l[c], off_l[c] = a, b
            else:
                a = _check_threshold(label, "on", value)
                on_l[c], off_l[c] = a, min(off_l[c], a)
        self.on = np.asarray(on_l, dtype=np.float64)
        self.off = np.asarray(off_l, dtype=np.float64)

        try:
            smoothing = self.config.per_class("smoothing_frames", n)
            min_event = self.config.per_class("min_event_s", n)
            min_gap = self.config.per_class("min_gap_s", n)
        except ConfigError as exc:
            raise ValueError(f"EventDecoder for labels {list(self.labels)}: {exc}") from None
        self.smoothing_frames = [int(k) for k in smoothing]
        # Per-class median windows, grouped: classes that share a window length share one median.
        self._smoothing_groups = [(k, np.array([c for c in range(n) if self.smoothing_frames[c] == k]))
                                  for k in sorted(set(self.smoothing_frames)) if k > 1]
        self._history_frames = max(self.smoothing_frames) - 1
        self.delay_frames = [(k - 1) // 2 if compensate_delay else 0 for k in self.smoothing_frames]
        self.min_event_frames = [max(1, seconds_to_frames(s, self.hop_s)) for s in min_event]
        # A gap of g frames merges when g < merge_below; an ended event is held back that long.
        self.merge_below = [seconds_to_frames(s, self.hop_s) for s in min_gap]
        self._hold = [max(1, m) for m in self.merge_below]
        self.reset()

    @property
    def decision_delay_frames(self) -> int:
        """Frames after which an onset is first reported, worst class: the smoother's delay
        plus the minimum event duration (a notice is sent once the event has lasted that long)."""
        return max(d + m - 1 for d, m in zip(self.delay_frames, self.min_event_frames))

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the stream: the next push starts a new one (nothing is emitted)."""
        n = len(self.labels)
        self._origin: int | None = None  # index of the stream's first frame
        self._next = 0  # index of the next frame expected
        self._hist: np.ndarray | None = None  # (k-1, C) last raw frames, for the median
        self._csum = np.zeros(n, dtype=np.float64)  # sum of smoothed p over frames < _next
        self._active = np.zeros(n, dtype=bool)  # hysteresis state after the last frame
        self._phase = [_IDLE] * n
        self._a = [0] * n  # onset frame of the current event
        self._sa = [0.0] * n  # csum at a
        self._b = [0] * n  # end frame of the last run (in a gap)
        self._sb = [0.0] * n  # csum at b
        self._noticed = [False] * n

    def snapshot(self) -> dict[str, Any]:
        """The decoder's whole state after the frames pushed so far, as plain JSON-able data:
        ``restore`` on a decoder built with the same labels, config and overrides continues the
        stream exactly (same events, same scores: floats survive JSON's round trip). A stream can
        so move to another process between two pushes."""
        return {
            "origin": self._origin, "next": self._next,
            "hist": None if self._hist is None else self._hist.tolist(),
            "csum": self._csum.tolist(), "active": self._active.tolist(), "phase": list(self._phase),
            "a": list(self._a), "sa": list(self._sa), "b": list(self._b), "sb": list(self._sb),
            "noticed": list(self._noticed),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a ``snapshot`` (ValueError if it was taken with other labels)."""
        n = len(self.labels)
        if len(state["csum"]) != n:
            raise ValueError(f"EventDecoder.restore: the snapshot has {len(state['csum'])} classes, this decoder {n} "
                             f"({list(self.labels)}); restore a snapshot of the same model")
        self._origin = None if state["origin"] is None else int(state["origin"])
        self._next = int(state["next"])
        self._hist = None if state["hist"] is None else np.asarray(state["hist"], dtype=np.float64).reshape(-1, n)
        self._csum = np.asarray(state["csum"], dtype=np.float64)
        self._active = np.asarray(state["active"], dtype=bool)
        self._phase = [int(x) for x in state["phase"]]
        self._a, self._b = [int(x) for x in state["a"]], [int(x) for x in state["b"]]
        self._sa, self._sb = [float(x) for x in state["sa"]], [float(x) for x in state["sb"]]
        self._noticed = [bool(x) for x in state["noticed"]]

    @property
    def next_frame(self) -> int:
        """Index of the next frame expected (counted from the stream's first frame, 0 unless
        the first push said otherwise or a snapshot was restored)."""
        return self._next

    @property
    def frames_seen(self) -> int:
        """Frames pushed since the stream started."""
        return 0 if self._origin is None else self._next - self._origin

    # ------------------------------------------------------------------ helpers
    def _time(self, c: int, frame: int) -> float:
        return max(frame - self.delay_frames[c], self._origin or 0) * self.hop_s

    def _event(self, c: int, b: int, sb: float, end_frame: int | None = None) -> SoundEvent:
        a = self._a[c]
        offset = self._time(c, b) if end_frame is None else end_frame * self.hop_s
        return SoundEvent(self.labels[c], self._time(c, a), offset, float((sb - self._sa[c]) / (b - a)))

    def _smooth(self, x: np.ndarray) -> np.ndarray:
        h = self._history_frames
        if h == 0:
            return x
        if self._hist is None:  # edge padding: the signal repeats its first frame before it
            self._hist = np.repeat(x[:1], h, axis=0)
        window = np.concatenate([self._hist, x], axis=0)  # (h + n, C): the last h raw frames, then x
        self._hist = window[-h:].copy()
        n = x.shape[0]
        out = x.copy()
        for k, classes in self._smoothing_groups:
            part = window[h - (k - 1):, classes]
            # (k, n, C_k) stack of shifted copies: a contiguous axis-0 median is faster than one
            # over a strided sliding-window view, with the same values.
            out[:, classes] = np.median(np.stack([part[i:i + n] for i in range(k)]), axis=0)
        return out

    # ------------------------------------------------------------------ API
    def push(self, probs: Any, first_frame: int | None = None) -> list[OnsetNotice | SoundEvent]:
        """Decode the next frames. probs: (n, C) probabilities, frames first_frame..first_frame+n-1.

        first_frame: None continues the stream; on the first push it may set the index of the
        stream's first frame (default 0); later it must equal the next frame expected.
        Returns notices and ended events in the order they were decided (frame, then class order).
        """
        x = np.asarray(probs, dtype=np.float64)
        n_cls = len(self.labels)
        if x.ndim != 2 or x.shape[1] != n_cls:
            raise ValueError(
                f"EventDecoder.push: probs must be (n_frames, {n_cls}) for labels {list(self.labels)}, "
                f"got shape {tuple(x.shape)}"
            )
        bad = ~np.isfinite(x)
        if bad.any():
            t, c = np.argwhere(bad)[0]
            raise ValueError(
                f"EventDecoder.push: non-finite probability {x[t, c]} at frame {t} of this chunk, "
                f"class {self.labels[c]!r} ({int(bad.sum())} in all); probabilities must be finite "
                "(the engine sanitises audio, so this is a bug upstream)"
            )
        if self._origin is None:
            if first_frame is not None and (int(first_frame) != first_frame or first_frame < 0):
                raise ValueError(f"EventDecoder.push: first_frame must be an integer >= 0, got {first_frame!r}")
            self._origin = self._next = int(first_frame or 0)
        elif first_frame is not None and first_frame != self._next:
            raise ValueError(
                f"EventDecoder.push: frames must be contiguous; expected first_frame={self._next}, "
                f"got {first_frame}"
            )
        n = x.shape[0]
        if n == 0:
            return []
        t0, t1 = self._next, self._next + n

        s = self._smooth(x)  # (n, C)
        # Prefix sums, accumulated sequentially from the carried total: the same additions in the
        # same order for any chunking, so scores are bit-identical. csum[i] = sum over frames < t0+i.
        csum = np.cumsum(np.concatenate([self._csum[None], s], axis=0), axis=0)

        # Hysteresis, vectorised: a frame sets the state (1 at p >= on, 0 at p < off) or keeps it.
        mark = np.where(s >= self.on, 1, np.where(s < self.off, 0, -1)).astype(np.int8)
        rows = np.arange(n)[:, None]
        last = np.maximum.accumulate(np.where(mark >= 0, rows, -1), axis=0)
        cols = np.arange(n_cls)[None, :]
        active = np.where(last >= 0, mark[np.maximum(last, 0), cols] == 1, self._active[None, :])
        prev = np.concatenate([self._active[None], active[:-1]], axis=0)
        t_idx, c_idx = np.nonzero(active != prev)

        out: list[tuple[int, int, OnsetNotice | SoundEvent]] = []
        trans_by_class: dict[int, list[int]] = {}
        for t, c in zip(t_idx.tolist(), c_idx.tolist()):
            trans_by_class.setdefault(c, []).append(t)
        for c in range(n_cls):
            trans = trans_by_class.get(c)
            if trans is None and (self._phase[c] == _IDLE or (self._phase[c] == _ACTIVE and self._noticed[c])):
                continue  # the common path: nothing changes and nothing is due in this class
            self._run_class(c, trans or [], t0, t1, csum, out)

        self._active = active[-1].copy()
        self._csum = csum[-1].copy()
        self._next = t1
        out.sort(key=lambda item: (item[0], item[1]))  # stable: decision frame, then class
        return [item for _, _, item in out]

    def _run_class(self, c: int, trans: list[int], t0: int, t1: int, csum: np.ndarray, out: list) -> None:
        """Walk one class through this chunk: transitions at chunk rows `trans`, deadlines between."""
        cursor = t0
        for tr in [t0 + r for r in trans] + [t1]:
            # Deadlines in [cursor, tr), where the phase is constant.
            phase = self._phase[c]
            if phase == _ACTIVE and not self._noticed[c]:
                due = max(cursor, self._a[c] + self.min_event_frames[c] - 1)
                if due < tr:
                    self._noticed[c] = True
                    mean = (csum[due + 1 - t0, c] - self._sa[c]) / (due + 1 - self._a[c])
                    out.append((due, c, OnsetNotice(self.labels[c], self._time(c, self._a[c]), float(mean))))
            elif phase == _GAP:
                due = self._b[c] + self._hold[c] - 1
                if due < tr:
                    if self._noticed[c]:
                        out.append((due, c, self._event(c, self._b[c], self._sb[c])))
                    self._phase[c] = _IDLE
            if tr == t1:
                break
            # The transition at frame tr (the state alternates, so it is an onset iff not in a run).
            if self._phase[c] == _ACTIVE:  # run ends: tr is the first inactive frame
                self._phase[c] = _GAP
                self._b[c], self._sb[c] = tr, float(csum[tr - t0, c])
            elif self._phase[c] == _GAP:  # a new run within the gap continues the event
                self._phase[c] = _ACTIVE
            else:  # a new event
                self._phase[c] = _ACTIVE
                self._a[c], self._sa[c] = tr, float(csum[tr - t0, c])
                self._noticed[c] = False
            cursor = tr

    def flush(self) -> list[SoundEvent]:
        """End the stream: close open and held-back events (long enough ones are returned, by
        onset then class order), then reset for a new stream."""
        out: list[tuple[float, int, SoundEvent]] = []
        end = self._next
        for c in range(len(self.labels)):
            if self._phase[c] == _ACTIVE and self._noticed[c]:
                ev = self._event(c, end, float(self._csum[c]), end_frame=end)
                out.append((ev.onset_s, c, ev))
            elif self._phase[c] == _GAP and self._noticed[c]:
                ev = self._event(c, self._b[c], self._sb[c])
                out.append((ev.onset_s, c, ev))
        self.reset()
        out.sort(key=lambda item: (item[0], item[1]))
        return [ev for _, _, ev in out]


def decode_offline(
    probs: Any,
    labels: Sequence[str],
    hop_s: float,
    config: DecoderConfig | None = None,
    overrides: Mapping[str, float | tuple[float, float]] | None = None,
) -> list[SoundEvent]:
    """Events of one whole file: probs (T, C) -> push all + flush, sorted by (onset_s, label)."""
    dec = EventDecoder(labels, hop_s, config, overrides)
    events = [e for e in dec.push(probs) if isinstance(e, SoundEvent)]
    events += dec.flush()
    return sorted(events, key=lambda e: (e.onset_s, e.label))


def smoothed_scores(probs: Any, labels: Sequence[str], config: DecoderConfig | None = None) -> np.ndarray:
    """The scores the decoder thresholds, aligned with the frames they describe: probs (T, C) ->
    (T, C) float64, each class through its median window (rule 1) and moved back by that window's
    delay D, so that frame t holds the smoothed value the decoder assigns to cell t. The last D
    frames of a class, whose window would reach past the end, repeat the last smoothed value (at
    ``flush()`` the decoder likewise takes an open event to the end). Threshold-free metrics
    (PSDS) of what the decoder decides on are computed on these."""
    dec = EventDecoder(labels, 1.0, config)
    x = np.asarray(probs, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(labels):
        raise ValueError(f"smoothed_scores: probs must be (n_frames, {len(labels)}), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        return x.copy()
    causal = dec._smooth(x)
    out = causal.copy()
    for c, d in enumerate(dec.delay_frames):
        if d > 0:
            out[:-d, c] = causal[d:, c]
            out[-d:, c] = causal[-1, c]
    return out


# ---------------------------------------------------------------------------------- writers
def _open_text(path_or_file: str | os.PathLike | IO[str]):
    """(file, close?) for a path or an open text file."""
    if isinstance(path_or_file, (str, os.PathLike)):
        return open(path_or_file, "w", encoding="utf-8", newline="\n"), True
    return path_or_file, False


def write_dcase_tsv(path_or_file: str | os.PathLike | IO[str], rows: Iterable[tuple[str, SoundEvent]]) -> None:
    """DCASE TSV: header ``filename onset offset event_label score`` (tab-separated), one line per
    (filename, event); times with 3 decimals (ms), score with 4."""
    f, close = _open_text(path_or_file)
    try:
        f.write(DCASE_TSV_HEADER + "\n")
        for filename, ev in rows:
            f.write(f"{filename}\t{ev.onset_s:.3f}\t{ev.offset_s:.3f}\t{ev.label}\t{ev.score:.4f}\n")
    finally:
        if close:
            f.close()


def write_audacity_labels(path_or_file: str | os.PathLike | IO[str], events: Iterable[SoundEvent]) -> None:
    """Audacity label track: ``onset<TAB>offset<TAB>label`` per line (seconds, 6 decimals as
    Audacity writes them), no header; import with File > Import > Labels."""
    f, close = _open_text(path_or_file)
    try:
        for ev in events:
            f.write(f"{ev.onset_s:.6f}\t{ev.offset_s:.6f}\t{ev.label}\n")
    finally:
        if close:
            f.close()


def event_to_json(item: SoundEvent | OnsetNotice) -> dict[str, Any]:
    """The JSONL form: ``{"type": "onset", "label", "onset_s"}`` for a notice,
    ``{"type": "event", "label", "onset_s", "offset_s", "score"}`` for an ended event.
    Times and score are rounded to 6 decimals (frame times like 3 * 0.02 are inexact floats)."""
    if isinstance(item, SoundEvent):
        return {"type": "event", "label": item.label, "onset_s": round(item.onset_s, 6),
                "offset_s": round(item.offset_s, 6), "score": round(item.score, 6)}
    if isinstance(item, OnsetNotice):
        return {"type": "onset", "label": item.label, "onset_s": round(item.onset_s, 6)}
    raise TypeError(f"event_to_json: expected a SoundEvent or an OnsetNotice, got {type(item).__name__}")
