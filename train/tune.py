"""``python -m train.tune``: the decoder chosen per class on the validation split.

    python -m train.tune --model runs/dnd_7_10/best.pt --data scenes/ --out runs/dnd_7_10/tuned.pt

For each class it chooses what the field's post-processing is made of: the median smoothing window
(frames), the hysteresis thresholds (on, off), the minimum event duration and the minimum gap that
merges two detections into one event. The objective is what a user of ``rtsed.live`` and
``rtsed.detect`` sees: event-based F1 as DCASE scores it (``--objective event_f1``, the default:
onset within 200 ms, offset within max(200 ms, 20 % of the event's length); ``onset_f1`` drops the
offset condition; sed_eval's rule and optimal matching, computed here directly so that thousands of
candidate decoders can be scored) or frame F1 (``--objective frame_f1``). The chosen settings go into a copy of the
checkpoint (``config.decoder``), which every engine then uses. Tuned on validation, never on test.

The search is coordinate descent per class: for every smoothing window, the (on, off) grid at the
current durations, then the (min event, min gap) grid at the best thresholds, twice. Candidates are
decoded by the decoder's own rules (rtsed.decode), vectorised over every file at once: the median
is computed once per window (``smooth_and_join``), and the hysteresis and duration rules run on it
(``decode_joined``), which gives the same events as ``EventDecoder`` with that window
(tests/test_tune.py and tests/test_tune_false_alarms.py check both against a per-frame reference,
tests/decode_reference.py).

What users feel beyond validation F1 can be part of the choice:

- ``--false-alarms DIR``: audio in which no target class sounds (the layout of ``train.evaluate
  --false-alarms``: a meta.csv category or sub-folder per file; ``speech`` events on speech files
  are right). Each candidate is also decoded there and its false alarms per minute cost
  ``--fa-weight`` F1 each, and/or ``--max-fa-per-min`` bounds them per class (a decoder over the
  bound is chosen only where none meets it, the one with the fewest). Build DIR from held-out
  world groups (``python -m train.heldout_world``), never from test audio.
- ``--shifts-ms 0 5 10 15``: every validation file also counts with its first 5, 10 and 15 ms cut
  off (train.shifted), so the F1 is over all sub-hop alignments of the frames and the decoder is
  chosen for events that hold at every one of them. ``--stability-weight W`` (with shift 0 among
  them) also charges W for every event of a file or its shifted copy that has no partner in the
  other (same class, onsets within 0.1 s: benchmarks.event_stability's rule), per reference event.
  Given several weights, it chooses one on validation files the decoder is not tuned on
  (``choose_stability_weight``): tuned on every other file, measured on the rest, the best held-out
  event F1 among the weights whose held-out events stay unchanged at least ``--stability-target``
  of the time; then the decoder is tuned with that weight on every file.
- ``--min-smoothing-frames K`` and ``--min-hysteresis D``: floors under every class's median
  window and on - off width. Where a probability hovers around a single threshold, a sub-hop
  shift makes or breaks events; a median over a few frames and a band between on and off absorb it.

Smoothing delays every decision by (k - 1) // 2 frames; ``--max-smoothing-s`` bounds that delay
(default 0.3 s, 0.1 s for causal models, whose point is a short latency). The delay is part of the
latency that ``rtsed.live`` states.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from rtsed.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rtsed.config import DecoderConfig
from rtsed.serve.decode import decode_offline, seconds_to_frames

ON_GRID = tuple(round(x, 2) for x in np.arange(0.10, 0.91, 0.05))
OFF_DROPS = (0.0, 0.1, 0.2, 0.3)  # off = on - drop (hysteresis width)
SMOOTHING_GRID = (1, 3, 5, 7, 9, 11, 15, 21, 27, 31)  # median window, frames (odd: exact delay)
MIN_EVENT_GRID_S = (0.0, 0.06, 0.1, 0.2, 0.3, 0.5, 1.0, 1.5, 2.0)
MIN_GAP_GRID_S = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0)
COLLAR_S = 0.2  # DCASE event-based metrics: onset collar (and the offset collar's floor)
OFFSET_FRACTION = 0.2  # offset collar: max(COLLAR_S, 20 % of the reference event's length)
OBJECTIVES = ("event_f1", "onset_f1", "frame_f1")


# ------------------------------------------------------------------------------ decoding one class


def smooth_and_join(signals: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``join`` of every signal through the decoder's causal median over k frames (rtsed.decode
    rule 1: frame t is the median of frames t-k+1..t, the file's first frame repeated before its
    start), in one median over every file's windows instead of one per file (the false-alarm
    audio is a thousand short files)."""
    signals = [np.asarray(x, np.float64) for x in signals]
    lengths = np.array([x.size for x in signals], int)
    if k == 1 or lengths.sum() == 0:
        return join(signals)
    present = [x for x in signals if x.size]
    padded = np.concatenate([part for x in present for part in (np.full(k - 1, x[0]), x)])
    sizes = lengths[lengths > 0]
    padded_start = np.cumsum(sizes + k - 1) - (sizes + k - 1)  # where each file's padding begins
    within = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    windows = np.lib.stride_tricks.sliding_window_view(padded, k)  # window j: padded[j:j + k]
    smoothed = np.median(windows[np.repeat(padded_start, sizes) + within], axis=1)
    parts = iter(np.split(smoothed, np.cumsum(sizes)[:-1]))
    return join([next(parts) if x.size else x for x in signals])


def join(signals: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-file (T_i,) signals as one (N,) signal for ``joined_events``: each file preceded by one
    frame of 0 (below every off threshold, so no event crosses from one file into the next).
    Returns (joined, file id per frame (N,), each file's first frame (n_files,))."""
    lengths = np.array([x.shape[0] for x in signals], int)
    first = np.cumsum(lengths + 1) - lengths
    parts = [part for x in signals for part in (np.zeros(1), np.asarray(x, np.float64))]
    joined = np.concatenate(parts) if parts else np.zeros(0)
    return joined, np.repeat(np.arange(lengths.size), lengths + 1), first


def joined_events(joined: np.ndarray, file_id: np.ndarray, on: float, off: float, min_event_frames: int,
                  gap_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """The events of every file of a ``join``ed, already smoothed signal by the decoder's rules 2-4
    (hysteresis, gap merging, minimum duration), before its delay compensation, without a Python
    loop over frames: (starts, ends) (n,) as joined frame indices [a, b)."""
    # Hysteresis as a state carried forward: on at p >= on, off at p < off, else the previous state.
    mark = np.where(joined >= on, 1, np.where(joined < off, 0, -1))
    last = np.maximum.accumulate(np.where(mark >= 0, np.arange(mark.size), 0))
    state = np.concatenate([[0], mark[last] == 1, [0]]).astype(np.int8)
    edges = np.diff(state)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if starts.size == 0:
        return starts, ends
    new_event = np.ones(starts.size, bool)  # a run joins the previous one across a short gap in its file
    new_event[1:] = (starts[1:] - ends[:-1] >= gap_frames) | (file_id[starts[1:]] != file_id[starts[:-1]])
    first = np.flatnonzero(new_event)
    last_run = np.append(first[1:] - 1, starts.size - 1)
    keep = ends[last_run] - starts[first] >= min_event_frames
    return starts[first][keep], ends[last_run][keep]


def count_events(joined: np.ndarray, file_id: np.ndarray, counted: np.ndarray, on: float, off: float,
                 min_event_frames: int, gap_frames: int) -> int:
    """How many events ``joined_events`` finds in the counted files (``counted`` (n_files,) bool)
    of a ``join``ed signal, summed."""
    starts, _ = joined_events(joined, file_id, on, off, min_event_frames, gap_frames)
    return int(np.sum(counted[file_id[starts]])) if starts.size else 0


def decode_joined(joined: np.ndarray, file_id: np.ndarray, first: np.ndarray, lengths: np.ndarray,
                  delay_frames: int, on: float, off: float, min_event_frames: int,
                  gap_frames: int) -> list[np.ndarray]:
    """The decoder's events of every file of a ``join``ed, already smoothed signal at once: per file
    (n, 2) frame cells [a, b), with its delay compensation (onsets and closed offsets move back by
    ``delay_frames``, clamped at 0; an event still open at the end of a file ends at its last
    frame)."""
    starts, ends = joined_events(joined, file_id, on, off, min_event_frames, gap_frames)
    f = file_id[starts] if starts.size else np.zeros(0, int)
    local_a, local_b = starts - first[f], ends - first[f]
    onset = np.maximum(local_a - delay_frames, 0)
    offset = np.where(local_b == lengths[f], local_b, local_b - delay_frames)
    cells = np.stack([onset, offset], axis=1)
    return np.split(cells, np.searchsorted(f, np.arange(1, lengths.size)))


@dataclass
class FalseAlarmAudio:
    """Audio in which no target class sounds, as train.false_alarms scores it: per file (T, C)
    probabilities and its category; an event of a class is false unless the class's label is the
    file's category. ``minutes``: the audio's length, the rate's denominator."""

    probs: list[np.ndarray]
    categories: list[str]
    minutes: float

    def __post_init__(self) -> None:
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def joined(self, c: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Class c's probabilities smoothed over k frames per file, joined as ``count_events``
        wants them: (signal (N,), file id (N,)). Every window of the last class asked for is kept:
        the search asks for each once per threshold pair and again in every round."""
        if (c, k) not in self._cache:
            if any(key[0] != c for key in self._cache):
                self._cache.clear()
            joined, file_id, _ = smooth_and_join([p[:, c] for p in self.probs], k)
            self._cache[(c, k)] = (joined, file_id)
        return self._cache[(c, k)]

    def per_minute(self, c: int, label: str, k: int, on: float, off: float, min_event_frames: int,
                   gap_frames: int) -> float:
        """False alarms of class c per minute under one decoder."""
        if not self.probs or self.minutes <= 0:
            return 0.0
        joined, file_id = self.joined(c, k)
        counted = np.array([category != label for category in self.categories])
        return count_events(joined, file_id, counted, on, off, min_event_frames, gap_frames) / self.minutes


# ------------------------------------------------------------------------------------- scoring


def event_matches(ref: np.ndarray, est: np.ndarray, collar_s: float = COLLAR_S,
                  offset_fraction: float | None = OFFSET_FRACTION) -> int:
    """Most (reference, estimate) pairs of one class that sed_eval's event-based metric counts as
    hits, each event used once (its optimal matching): onsets within ``collar_s`` and, unless
    ``offset_fraction`` is None (onset only), offsets within max(collar_s, offset_fraction x the
    reference's length). ref, est: (n, 2) onset and offset times in seconds. The comparisons are
    sed_eval's own, in float64 without any tolerance, so an estimate that lands on a collar's edge
    by rounding (2.2 - 2.0 > 0.2) is a miss here exactly when sed_eval calls it one."""
    ref = np.asarray(ref, float).reshape(-1, 2)
    est = np.asarray(est, float).reshape(-1, 2)
    if ref.size == 0 or est.size == 0:
        return 0
    ok = np.abs(ref[:, None, 0] - est[None, :, 0]) <= collar_s
    if offset_fraction is not None:
        tolerance = np.maximum(collar_s, offset_fraction * (ref[:, 1] - ref[:, 0]))
        ok &= np.abs(ref[:, None, 1] - est[None, :, 1]) <= tolerance[:, None]
    if not ok.any():
        return 0
    match = maximum_bipartite_matching(csr_matrix(ok), perm_type="column")
    return int(np.sum(match >= 0))


FILE_SPAN_S = 1e6  # sort keys file * FILE_SPAN_S + onset_s keep every file's events apart (no file is that long)
CANDIDATE_SLACK_S = 1e-6  # candidates are gathered this much beyond a tolerance; the exact test decides


def _pairs_within(a_key: np.ndarray, b_key: np.ndarray, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Every index pair (i, j) with b_key[j] in [a_key[i] - reach, a_key[i] + reach]; b_key (m,)
    sorted ascending. The candidate edges of a matching, found without an (n, m) matrix."""
    lo = np.searchsorted(b_key, a_key - reach, "left")
    hi = np.searchsorted(b_key, a_key + reach, "right")
    counts = np.maximum(hi - lo, 0)
    rows = np.repeat(np.arange(a_key.size), counts)
    cols = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts - lo, counts)
    return rows, cols


def _matching_size(rows: np.ndarray, cols: np.ndarray, n_a: int, n_b: int) -> int:
    """Size of a maximum one-to-one matching of the bipartite graph with edges (rows[i], cols[i])."""
    if rows.size == 0:
        return 0
    graph = csr_matrix((np.ones(rows.size, np.int8), (rows, cols)), shape=(n_a, n_b))
    return int(np.sum(maximum_bipartite_matching(graph, perm_type="column") >= 0))


def _flat_cells(cells_per_file: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Per-file (n_i, 2) frame cells as one (n, 2) float array and each cell's file index (n,)."""
    parts = [np.asarray(c, float).reshape(-1, 2) for c in cells_per_file]
    sizes = np.array([p.shape[0] for p in parts], int)
    cells = np.concatenate(parts) if parts else np.zeros((0, 2))
    return cells, np.repeat(np.arange(sizes.size), sizes)


@dataclass
class ClassTarget:
    """One class's validation reference: per file, reference events as (n, 2) onset/offset
    seconds and (T,) frame activity."""

    events: list[np.ndarray]
    frames: list[np.ndarray]

    @property
    def n_events(self) -> int:
        return int(sum(e.shape[0] for e in self.events))

    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every file's reference events at once, sorted by (file, onset): (events (n, 2) seconds,
        file index (n,), sort key (n,)). Computed once."""
        if getattr(self, "_flat", None) is None:
            events, file_id = _flat_cells(self.events)
            key = file_id * FILE_SPAN_S + events[:, 0]
            order = np.argsort(key, kind="stable")
            self._flat = (events[order], file_id[order], key[order])
        return self._flat


def match_counts(cells_per_file: Sequence, target: ClassTarget, hop_s: float, objective: str) -> tuple[int, int, int]:
    """(true positives, estimated, reference) of one class's decoded events over every validation
    file: events for ``event_f1`` / ``onset_f1``, frames for ``frame_f1``. cells_per_file: (n_i, 2)
    frame cells [a, b) per file."""
    if objective in ("event_f1", "onset_f1"):
        # event_matches' test on every file at once: candidate pairs come from sorted onsets (same
        # file, onsets within the collar), the comparisons are event_matches' own on the same values,
        # and a maximum matching of the union of the files' graphs is the sum of theirs.
        est, est_file = _flat_cells(cells_per_file)
        est = est * hop_s
        ref, ref_file, ref_key = target.flat()
        rows, cols = _pairs_within(ref_key, est_file * FILE_SPAN_S + est[:, 0], COLLAR_S + CANDIDATE_SLACK_S)
        ok = (ref_file[rows] == est_file[cols]) & (np.abs(ref[rows, 0] - est[cols, 0]) <= COLLAR_S)
        if objective == "event_f1":
            tolerance = np.maximum(COLLAR_S, OFFSET_FRACTION * (ref[rows, 1] - ref[rows, 0]))
            ok &= np.abs(ref[rows, 1] - est[cols, 1]) <= tolerance
        return _matching_size(rows[ok], cols[ok], ref.shape[0], est.shape[0]), est.shape[0], target.n_events
    tp = n_est = n_ref = 0
    for cells, ref in zip(cells_per_file, target.frames):
        pred = np.zeros(ref.shape[0], bool)
        for a, b in np.asarray(cells, int).reshape(-1, 2):
            pred[a:b] = True
        tp += int(np.sum(pred & ref))
        n_est += int(np.sum(pred))
        n_ref += int(np.sum(ref))
    return tp, n_est, n_ref


def f1_of(tp: int, n_est: int, n_ref: int) -> float:
    """2 tp / (estimated + reference); 0 when both are empty."""
    return 2.0 * tp / (n_est + n_ref) if n_est + n_ref else 0.0


def score(cells_per_file: Sequence, target: ClassTarget, hop_s: float, objective: str) -> float:
    """F1 of one class's decoded events over every validation file."""
    return f1_of(*match_counts(cells_per_file, target, hop_s, objective))


# -------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class ClassDecoder:
    """One class's decoder settings and their validation score."""

    smoothing_frames: int = 1
    on: float = 0.5
    off: float = 0.5
    min_event_s: float = 0.0
    min_gap_s: float = 0.0
    score: float = 0.0  # the search's objective: F1, less the false-alarm cost when there is one
    f1: float = 0.0
    fa_per_min: float = 0.0  # on the false-alarm audio (0 without it)
    flicker: float = 0.0  # events without a partner across shifts, per reference event (0 without shifts)


@dataclass(frozen=True)
class FalseAlarmCost:
    """What false alarms cost a candidate decoder: ``weight`` x its false alarms per minute on
    ``audio`` are taken off its F1, and with ``max_per_min`` a decoder above that rate is never
    chosen over one at or below it (among those above, fewer false alarms win)."""

    audio: FalseAlarmAudio
    weight: float = 0.0
    max_per_min: float | None = None

    def objective(self, f1: float, fa_per_min: float) -> float:
        if self.max_per_min is not None and fa_per_min > self.max_per_min + 1e-12:
            return -1e6 - fa_per_min  # below every decoder that meets the bound
        return f1 - self.weight * fa_per_min


STABILITY_TOLERANCE_S = 0.1  # benchmarks.event_stability's: same label, onsets at most 0.1 s apart


@dataclass(frozen=True)
class ShiftPair:
    """A validation file (index ``whole`` among the tuning outputs) and its copy without the
    first ``shift_s`` seconds (index ``cut``)."""

    whole: int
    cut: int
    shift_s: float


@dataclass(frozen=True)
class StabilityCost:
    """What events that change with the frames' alignment cost a candidate decoder: ``weight`` x
    the events of a file and its shifted copy that have no partner in the other (same class,
    onsets within 0.1 s, one to one, as benchmarks.event_stability counts them), per reference
    event of the whole files. Reporting nothing is perfectly stable, so this is a cost beside F1,
    never an objective of its own."""

    pairs: tuple[ShiftPair, ...]
    weight: float

    def flicker(self, cells_per_file: Sequence[np.ndarray], target: ClassTarget, hop_s: float) -> float:
        """Events without a partner across every pair, per reference event of the whole files.
        cells_per_file: (n_i, 2) frame cells per tuning output."""
        n_a, n_b, matched = self.partners(cells_per_file, hop_s)
        references = sum(target.events[pair.whole].shape[0] for pair in self.pairs)
        return (n_a + n_b - 2 * matched) / max(references, 1)

    def partners(self, cells_per_file: Sequence[np.ndarray], hop_s: float) -> tuple[int, int, int]:
        """(events of the whole files, events of the shifted copies, partners between them) over
        every pair: benchmarks.event_stability's Stability counts, one class at a time."""
        onsets = [np.asarray(cells_per_file[i], float).reshape(-1, 2)[:, 0] * hop_s for i in range(len(cells_per_file))]
        a = [onsets[pair.whole] for pair in self.pairs]
        b = [onsets[pair.cut] + pair.shift_s for pair in self.pairs]
        a_pair, b_pair = (np.repeat(np.arange(len(self.pairs)), [x.size for x in side]) for side in (a, b))
        a, b = (np.concatenate(side) if side else np.zeros(0) for side in (a, b))
        rows, cols = _pairs_within(a_pair * FILE_SPAN_S + a, b_pair * FILE_SPAN_S + b,
                                   STABILITY_TOLERANCE_S + CANDIDATE_SLACK_S)
        ok = (a_pair[rows] == b_pair[cols]) & (np.abs(a[rows] - b[cols]) <= STABILITY_TOLERANCE_S + 1e-9)
        return a.size, b.size, _matching_size(rows[ok], cols[ok], a.size, b.size)


def tune_class(probs: Sequence[np.ndarray], target: ClassTarget, hop_s: float, objective: str = "event_f1",
               smoothing_grid: Sequence[int] = SMOOTHING_GRID, rounds: int = 2,
               min_event_grid_s: Sequence[float] = MIN_EVENT_GRID_S,
               min_gap_grid_s: Sequence[float] = MIN_GAP_GRID_S,
               false_alarms: FalseAlarmCost | None = None, class_index: int = 0,
               label: str = "", stability: StabilityCost | None = None, min_smoothing_frames: int = 1,
               min_hysteresis: float = 0.0) -> ClassDecoder:
    """The best decoder for one class: probs are its (T,) probabilities per validation file. The
    search starts from on = 0.5 at the smallest allowed smoothing window and hysteresis width
    (``min_smoothing_frames``, ``min_hysteresis``: floors that no candidate goes below, for
    events that do not flicker where the probability hovers around one threshold) and the first
    value of each duration grid. With
    ``false_alarms``, each candidate also decodes column ``class_index`` of the false-alarm audio
    (events labelled ``label`` are right on files of that category) and pays for what it reports;
    with ``stability``, it pays for events that change between a file and its shifted copy."""
    lengths = np.array([p.shape[0] for p in probs], int)

    smoothed_by_window: dict[int, tuple] = {}

    def smooth(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if k not in smoothed_by_window:
            smoothed_by_window[k] = (*smooth_and_join(probs, k), lengths)
        return smoothed_by_window[k]

    def evaluate(k: int, smoothed: tuple, on: float, off: float, min_event_s: float,
                 min_gap_s: float) -> ClassDecoder:
        min_event_frames = max(1, seconds_to_frames(min_event_s, hop_s))
        gap_frames = seconds_to_frames(min_gap_s, hop_s)
        cells = decode_joined(*smoothed, (k - 1) // 2, on, off, min_event_frames, gap_frames)
        f1 = score(cells, target, hop_s, objective)
        flicker = stability.flicker(cells, target, hop_s) if stability is not None else 0.0
        value = f1 - (stability.weight * flicker if stability is not None else 0.0)
        if false_alarms is None:
            return ClassDecoder(k, on, off, min_event_s, min_gap_s, value, f1, 0.0, flicker)
        fa = false_alarms.audio.per_minute(class_index, label, k, on, off, min_event_frames, gap_frames)
        return ClassDecoder(k, on, off, min_event_s, min_gap_s, false_alarms.objective(value, fa), f1, fa, flicker)

    windows = [k for k in smoothing_grid if k >= min_smoothing_frames] or [min_smoothing_frames]
    drops = [d for d in OFF_DROPS if d >= min_hysteresis - 1e-9] or [round(min_hysteresis, 2)]
    start_event_s, start_gap_s = min_event_grid_s[0], min_gap_grid_s[0]
    best = evaluate(windows[0], smooth(windows[0]), 0.5, round(0.5 - drops[0], 2), start_event_s, start_gap_s)
    current = best
    for _ in range(rounds):
        improved = False
        for k in windows:
            smoothed = smooth(k)
            for on in ON_GRID:
                for drop in drops:
                    off = round(on - drop, 2)
                    if off < 0.05:
                        continue
                    candidate = evaluate(k, smoothed, on, off, current.min_event_s, current.min_gap_s)
                    if candidate.score > best.score + 1e-9:
                        best, improved = candidate, True
        smoothed = smooth(best.smoothing_frames)
        for min_event_s in min_event_grid_s:
            for min_gap_s in min_gap_grid_s:
                candidate = evaluate(best.smoothing_frames, smoothed, best.on, best.off, min_event_s, min_gap_s)
                if candidate.score > best.score + 1e-9:
                    best, improved = candidate, True
        current = best
        if not improved:
            break
    return best


def class_target(outputs, c: int, label: str) -> ClassTarget:
    """Reference onsets and frame activity of class ``c`` per evaluated file (train.evaluate's
    FileOutput: events, targets)."""
    events = [np.array([(e.onset_s, e.offset_s) for e in o.events if e.event_label == label], float).reshape(-1, 2)
              for o in outputs]
    frames = [o.targets[:, c] > 0.5 for o in outputs]
    return ClassTarget(events, frames)


def default_max_smoothing_s(lookahead_frames: int) -> float:
    """The largest smoother delay tuning may choose (s): 0.1 s for a causal model (lookahead 0),
    whose point is a short latency, else 0.3 s."""
    return 0.1 if lookahead_frames == 0 else 0.3


def tune_decoder(outputs, hop_s: float, labels: Sequence[str], objective: str = "event_f1",
                 max_smoothing_s: float = 0.3, min_event_s: float | None = None,
                 min_gap_s: float | None = None, rounds: int = 2,
                 false_alarms: FalseAlarmCost | None = None,
                 stability: StabilityCost | None = None, min_smoothing_frames: int = 1,
                 min_hysteresis: float = 0.0) -> tuple[DecoderConfig, list[dict]]:
    """Per-class decoder settings chosen on ``outputs`` (train.evaluate.predict's FileOutputs, or
    anything with ``probs`` (T, C), ``targets`` (T, C) and ``events``; shifted copies of the same
    files simply add to the pool the F1 is counted over).
    ``min_event_s`` / ``min_gap_s`` fix that duration for every class instead of searching it;
    ``rounds`` bounds the coordinate-descent passes (fewer: faster, at most as good);
    ``false_alarms`` makes each class pay for the events it reports on audio without targets,
    ``stability`` for its events that change with the frames' alignment;
    ``min_smoothing_frames`` (median window, frames) and ``min_hysteresis`` (on - off) are floors
    under every class's choice.
    A class without reference events keeps the defaults (0.5, no smoothing, the fixed or zero
    durations): there is nothing to tune it on. Returns the config and one row per class."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {OBJECTIVES}")
    max_delay = int(np.floor(max_smoothing_s / hop_s + 1e-9))
    grid = [k for k in SMOOTHING_GRID if (k - 1) // 2 <= max_delay]
    if not grid or min_smoothing_frames > grid[-1]:
        raise ValueError(f"a smoothing window of at least {min_smoothing_frames} frames delays events by more than "
                         f"the {max_smoothing_s:g} s allowed (max_smoothing_s): lower the floor or raise the bound")
    if not 0.0 <= min_hysteresis <= OFF_DROPS[-1]:
        raise ValueError(f"min_hysteresis {min_hysteresis}: the search's hysteresis widths (on - off) are "
                         f"{OFF_DROPS}; give a floor between 0 and {OFF_DROPS[-1]}")
    chosen, table = [], []
    for c, label in enumerate(labels):
        target = class_target(outputs, c, label)
        probs = [np.asarray(o.probs[:, c], np.float64) for o in outputs]
        search = {"min_event_grid_s": MIN_EVENT_GRID_S if min_event_s is None else (min_event_s,),
                  "min_gap_grid_s": MIN_GAP_GRID_S if min_gap_s is None else (min_gap_s,),
                  "false_alarms": false_alarms, "class_index": c, "label": label, "stability": stability}
        default = tune_class(probs, target, hop_s, objective, smoothing_grid=(1,), rounds=0, **search)
        best = tune_class(probs, target, hop_s, objective, grid, rounds, min_smoothing_frames=min_smoothing_frames,
                          min_hysteresis=min_hysteresis, **search) if target.n_events else default
        chosen.append(best)
        row = {"class": c, "label": label, "smoothing_frames": best.smoothing_frames, "on": best.on,
               "off": best.off, "min_event_s": best.min_event_s, "min_gap_s": best.min_gap_s,
               f"{objective}_tuned": best.f1, f"{objective}_default": default.f1,
               "reference_events": target.n_events}
        if false_alarms is not None:
            row.update(fa_per_min_tuned=best.fa_per_min, fa_per_min_default=default.fa_per_min)
        if stability is not None:
            row.update(flicker_tuned=best.flicker, flicker_default=default.flicker)
        table.append(row)
    config = DecoderConfig(
        on_thresholds=tuple(d.on for d in chosen), off_thresholds=tuple(d.off for d in chosen),
        min_event_s=tuple(d.min_event_s for d in chosen), min_gap_s=tuple(d.min_gap_s for d in chosen),
        smoothing_frames=tuple(d.smoothing_frames for d in chosen))
    return config, table


@dataclass(frozen=True)
class HeldOutFigures:
    """What a decoder tuned with one stability weight gives on validation files it was not tuned
    on, over every class at once (micro): event and frame F1 on the whole files, and the share of
    events unchanged between each file and its shifted copies (benchmarks.event_stability's
    figure: same class, onsets within 0.1 s, one to one)."""

    stability_weight: float
    event_f1: float
    frame_f1: float
    unchanged: float


def split_halves(outputs: Sequence, pairs: Sequence[ShiftPair]) -> tuple[tuple[list, tuple], tuple[list, tuple]]:
    """Two halves of the validation files, each with its shifted copies: whole files alternate
    (in their order) between half A and half B. Returns ((outputs, pairs) of A, (outputs, pairs) of
    B), pairs re-indexed into their half."""
    cuts = {pair.cut for pair in pairs}
    wholes = [i for i in range(len(outputs)) if i not in cuts]
    halves = []
    for members in (wholes[0::2], wholes[1::2]):
        index = {i: n for n, i in enumerate(members)}
        part, part_pairs = [outputs[i] for i in members], []
        for pair in pairs:
            if pair.whole in index:
                part_pairs.append(ShiftPair(index[pair.whole], len(part), pair.shift_s))
                part.append(outputs[pair.cut])
        halves.append((part, tuple(part_pairs)))
    return halves[0], halves[1]


def held_out_figures(outputs: Sequence, pairs: Sequence[ShiftPair], hop_s: float, labels: Sequence[str],
                     decoder: DecoderConfig) -> tuple[float, float, float]:
    """(event F1, frame F1, share of events unchanged under the shifts) of ``decoder`` on
    ``outputs``, F1 over the files that are no pair's shifted copy; decoded by the search's rules
    (``decode_joined``, equal to EventDecoder)."""
    cuts = {pair.cut for pair in pairs}
    wholes = [i for i in range(len(outputs)) if i not in cuts]
    n = len(labels)
    on, off = decoder.thresholds(n)
    windows = decoder.per_class("smoothing_frames", n)
    min_event, min_gap = decoder.per_class("min_event_s", n), decoder.per_class("min_gap_s", n)
    lengths = np.array([o.probs.shape[0] for o in outputs], int)
    events, frames, stability = np.zeros(3, int), np.zeros(3, int), np.zeros(3, int)
    partners = StabilityCost(tuple(pairs), 0.0)
    for c, label in enumerate(labels):
        k = windows[c]
        joined, file_id, first = smooth_and_join([o.probs[:, c] for o in outputs], k)
        cells = decode_joined(joined, file_id, first, lengths, (k - 1) // 2, on[c], off[c],
                              max(1, seconds_to_frames(min_event[c], hop_s)), seconds_to_frames(min_gap[c], hop_s))
        target = class_target([outputs[i] for i in wholes], c, label)
        events += match_counts([cells[i] for i in wholes], target, hop_s, "event_f1")
        frames += match_counts([cells[i] for i in wholes], target, hop_s, "frame_f1")
        stability += partners.partners(cells, hop_s)
    n_a, n_b, matched = (int(v) for v in stability)
    return f1_of(*events), f1_of(*frames), 1.0 if n_a + n_b == 0 else 2.0 * matched / (n_a + n_b)


def choose_stability_weight(outputs: Sequence, pairs: Sequence[ShiftPair], hop_s: float, labels: Sequence[str],
                            weights: Sequence[float], target_unchanged: float = 0.9,
                            max_frame_f1_drop: float = 0.02, **tune_kwargs) -> tuple[float, list[HeldOutFigures]]:
    """The stability weight chosen on validation files the decoder was not tuned on: for every
    weight, decoders are tuned on half A of the files (with their shifted copies, ``split_halves``)
    and measured on half B (``held_out_figures``). Eligible: the weights whose events stay
    unchanged at least ``target_unchanged`` of the time on B and whose frame F1 on B is at most
    ``max_frame_f1_drop`` below the smallest weight's (steady events should not cost the frames
    they cover). Chosen: the eligible weight with the best event F1 on B; where none is eligible,
    the steadiest. Ties go to the smaller weight. ``tune_kwargs`` go to every
    ``tune_decoder`` call (objective, floors, false-alarm cost, ...). Returns (weight, one row per
    weight)."""
    (a, a_pairs), (b, b_pairs) = split_halves(outputs, pairs)
    if not a_pairs or not b_pairs:
        raise ValueError("choosing a stability weight needs shifted copies of at least two validation files")
    rows = []
    for weight in sorted(set(weights)):
        decoder, _ = tune_decoder(a, hop_s, labels, stability=StabilityCost(a_pairs, weight), **tune_kwargs)
        rows.append(HeldOutFigures(weight, *held_out_figures(b, b_pairs, hop_s, labels, decoder)))
    eligible = [r for r in rows if r.unchanged >= target_unchanged and r.frame_f1 >= rows[0].frame_f1 - max_frame_f1_drop]
    best = max(eligible, key=lambda r: r.event_f1) if eligible else max(rows, key=lambda r: r.unchanged)
    return best.stability_weight, rows


def decoded_cells(probs: np.ndarray, hop_s: float, labels: Sequence[str], decoder: DecoderConfig) -> dict[str, list]:
    """Cells [a, b) per label of the real decoder on (T, C) probabilities (for checking the search)."""
    out: dict[str, list] = {label: [] for label in labels}
    for e in decode_offline(probs, labels, hop_s, decoder):
        out[e.label].append((int(round(e.onset_s / hop_s)), int(round(e.offset_s / hop_s))))
    return out


# ------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint to tune (.pt)")
    p.add_argument("--data", help="data root (TUT-SED 2016 or train.synth output)")
    p.add_argument("--val-data", nargs=2, metavar=("AUDIO_DIR", "TSV"), help="a DCASE-format validation split")
    p.add_argument("--split", default="validate")
    p.add_argument("--out", required=True, help="output checkpoint with the tuned decoder")
    p.add_argument("--objective", choices=OBJECTIVES, default="event_f1",
                   help="what to maximise per class (default: event F1, 200 ms onset collar)")
    p.add_argument("--max-smoothing-s", type=float, default=None,
                   help="largest median-smoother delay allowed (default 0.3 s; 0.1 s for causal models)")
    p.add_argument("--min-smoothing-frames", type=int, default=1,
                   help="smallest median window any class may get, frames (default 1: no floor; 5 removes blips "
                        "of up to 2 frames that a sub-hop shift can make or break)")
    p.add_argument("--min-hysteresis", type=float, default=0.0,
                   help="smallest on - off width any class may get (default 0; 0.1 keeps a probability hovering "
                        "around one threshold from splitting an event)")
    p.add_argument("--min-event-s", type=float, help="fix every class's minimum event duration instead of tuning it")
    p.add_argument("--min-gap-s", type=float, help="fix every class's minimum gap instead of tuning it")
    p.add_argument("--false-alarms", metavar="DIR",
                   help="audio without target classes (train.evaluate --false-alarms's folder layout): each "
                        "candidate pays for the false alarms it reports there; never the test folder")
    p.add_argument("--fa-weight", type=float, default=0.0,
                   help="F1 given up per false alarm per minute of a class (with --false-alarms; default 0)")
    p.add_argument("--max-fa-per-min", type=float, default=None,
                   help="per class, choose only decoders with at most this many false alarms per minute on "
                        "--false-alarms (where none reaches it, the fewest)")
    p.add_argument("--shifts-ms", type=float, nargs="+", default=[0.0],
                   help="tune on every validation file at each of these shifts (its first ms cut off), F1 "
                        "counted over all of them, for events that hold wherever the frames fall (e.g. 0 5 10 15)")
    p.add_argument("--stability-weight", type=float, nargs="+", default=[0.0],
                   help="with --shifts-ms 0 and others: F1 given up per event that changes between a file and "
                        "its shifted copies (per reference event; default 0). Several values: the one chosen on "
                        "held-out validation files (choose_stability_weight: tuned on half of the files, the "
                        "best event F1 on the other half among those meeting --stability-target)")
    p.add_argument("--stability-target", type=float, default=0.9,
                   help="with several --stability-weight values: the share of events that must stay unchanged "
                        "under the shifts on the held-out half (default 0.9)")
    p.add_argument("--cache-dir", default=None)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse option combinations that cannot mean what they say (argparse's exit 2 and message)."""
    if any(args.stability_weight) or len(args.stability_weight) > 1:
        if 0.0 not in args.shifts_ms or len(set(args.shifts_ms)) < 2:
            p.error("--stability-weight compares each file with its shifted copies: give --shifts-ms 0 and at least "
                    "one other shift, e.g. --shifts-ms 0 5 10 15")
    if any(w < 0 for w in args.stability_weight):
        p.error("--stability-weight must be >= 0")
    if (args.fa_weight or args.max_fa_per_min is not None) and not args.false_alarms:
        p.error("--fa-weight and --max-fa-per-min need --false-alarms DIR (audio without target classes)")
    if args.fa_weight < 0 or (args.max_fa_per_min is not None and args.max_fa_per_min < 0):
        p.error("--fa-weight and --max-fa-per-min must be >= 0")
    if any(ms < 0 for ms in args.shifts_ms):
        p.error("--shifts-ms: a shift cuts audio off the start of each file; give values >= 0")
    if args.min_smoothing_frames < 1:
        p.error("--min-smoothing-frames must be >= 1 (1 = no floor)")
    if not 0.0 <= args.min_hysteresis <= OFF_DROPS[-1]:
        p.error(f"--min-hysteresis: the search's widths (on - off) are {OFF_DROPS}; give a floor from 0 to {OFF_DROPS[-1]}")


def tune_and_save(ckpt, outputs: Sequence, pairs: Sequence[ShiftPair], cost: FalseAlarmCost | None,
                  args: argparse.Namespace) -> tuple[list[dict], list[HeldOutFigures]]:
    """The search and its checkpoint, once the probabilities are there: ``outputs`` (whole
    validation files, then their shifted copies as ``pairs`` name them), the false-alarm cost, and
    the CLI's options. Writes ``args.out``; returns the per-class table and, when several stability
    weights were given, the held-out figures of each."""
    hop_s, labels = ckpt.config.frontend.hop_s, ckpt.config.labels
    search = dict(objective=args.objective, max_smoothing_s=args.max_smoothing_s, min_event_s=args.min_event_s,
                  min_gap_s=args.min_gap_s, false_alarms=cost, min_smoothing_frames=args.min_smoothing_frames,
                  min_hysteresis=args.min_hysteresis)
    weight, choice = args.stability_weight[0], []
    if len(set(args.stability_weight)) > 1:
        weight, choice = choose_stability_weight(outputs, pairs, hop_s, labels, args.stability_weight,
                                                 args.stability_target, **search)
    stability = StabilityCost(tuple(pairs), weight) if weight else None
    tuned, table = tune_decoder(outputs, hop_s, labels, stability=stability, **search)
    config = ckpt.config.replace(decoder=tuned)
    metadata = dict(ckpt.metadata, tuned_on=f"{args.data or args.val_data} split {args.split}",
                    tuning_objective=args.objective, tuning_max_smoothing_s=args.max_smoothing_s,
                    tuning_min_smoothing_frames=args.min_smoothing_frames, tuning_min_hysteresis=args.min_hysteresis,
                    tuning_shifts_ms=list(args.shifts_ms), tuning_stability_weight=weight, tuning=table)
    if choice:
        metadata.update(tuning_stability_weights=sorted(set(args.stability_weight)),
                        tuning_stability_target=args.stability_target,
                        tuning_stability_choice=[asdict(r) for r in choice])
    if cost is not None:
        metadata.update(tuning_false_alarms=str(args.false_alarms), tuning_fa_weight=args.fa_weight,
                        tuning_max_fa_per_min=args.max_fa_per_min, tuning_fa_minutes=cost.audio.minutes)
    save_checkpoint(Path(args.out), ckpt.model, config, metadata)
    return table, choice


def print_table(table: list[dict], choice: list[HeldOutFigures], args: argparse.Namespace, with_fa: bool,
                with_stability: bool) -> None:
    if choice:
        print(f"stability weight chosen on held-out validation files (tuned on half, measured on the other; "
              f"target {args.stability_target:.0%} unchanged):")
        print(f"  {'weight':>6}  {'event F1':>8}  {'frame F1':>8}  {'unchanged':>9}")
        for r in choice:
            print(f"  {r.stability_weight:6.3g}  {r.event_f1:8.3f}  {r.frame_f1:8.3f}  {r.unchanged:9.3f}")
    key = args.objective
    head = ("  FA/min tuned / default" if with_fa else "") + ("  flicker tuned / default" if with_stability else "")
    print(f"{'label':>18}  {'median':>6} {'on':>5} {'off':>5} {'min ev':>6} {'min gap':>7}  {key} tuned / default"
          + head)
    for row in table:
        fa = f"  {row['fa_per_min_tuned']:6.2f} / {row['fa_per_min_default']:.2f}" if with_fa else ""
        if with_stability:
            fa += f"  {row['flicker_tuned']:6.2f} / {row['flicker_default']:.2f}"
        print(f"{row['label']:>18}  {row['smoothing_frames']:6d} {row['on']:5.2f} {row['off']:5.2f} "
              f"{row['min_event_s']:6.2f} {row['min_gap_s']:7.2f}  {row[key + '_tuned']:.3f} / {row[key + '_default']:.3f}"
              + fa + ("" if row["reference_events"] else "  (no validation events: defaults)"))
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    from train.data_sources import open_dataset
    from train.evaluate import predict
    from train.false_alarms import FalseAlarmError, false_alarm_probabilities
    from train.shifted import shifted_outputs

    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    args.train_data = args.test_data = None
    args.labels = None
    try:
        ckpt = load_checkpoint(args.model)
    except CheckpointError as exc:
        print(f"train.tune: {exc}", file=sys.stderr)
        return 2
    if args.max_smoothing_s is None:
        args.max_smoothing_s = default_max_smoothing_s(ckpt.config.model.lookahead_frames)
    dataset = open_dataset(args)
    outputs = predict(ckpt, dataset.split(args.split), cache_dir=args.cache_dir)
    whole, outputs, pairs = outputs, (list(outputs) if 0.0 in args.shifts_ms else []), []
    rate = ckpt.config.frontend.sample_rate_hz
    for ms in sorted(set(args.shifts_ms) - {0.0}):
        for i, o in enumerate(whole):
            for cut in shifted_outputs(ckpt, [o], ms / 1000):  # none when the cut leaves no frame
                pairs.append(ShiftPair(i, len(outputs), round(ms / 1000 * rate) / rate))
                outputs.append(cut)
    cost = None
    if args.false_alarms:
        try:
            probs, categories, minutes = false_alarm_probabilities(ckpt, args.false_alarms)
        except FalseAlarmError as exc:
            print(f"train.tune: {exc}", file=sys.stderr)
            return 2
        cost = FalseAlarmCost(FalseAlarmAudio(probs, categories, minutes), args.fa_weight, args.max_fa_per_min)
    try:
        table, choice = tune_and_save(ckpt, outputs, pairs, cost, args)
    except ValueError as exc:
        print(f"train.tune: {exc}", file=sys.stderr)
        return 2
    print_table(table, choice, args, cost is not None, bool(table) and "flicker_tuned" in table[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
