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
decoded by the decoder's own rules (rtsed.decode): the median is computed once per window, and the
hysteresis and duration rules run on it (``decode_smoothed``), which gives the same events as
``EventDecoder`` with that window (tests/test_tune.py checks it).

Smoothing delays every decision by (k - 1) // 2 frames; ``--max-smoothing-s`` bounds that delay
(default 0.3 s, 0.1 s for causal models, whose point is a short latency). The delay is part of the
latency that ``rtsed.live`` states.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
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


def median_smooth(x: np.ndarray, k: int) -> np.ndarray:
    """The decoder's causal median over k frames with edge padding: (T,) -> (T,), frame t is the
    median of frames t-k+1..t, the first frame repeated before the start (rtsed.decode rule 1)."""
    if k == 1:
        return x
    padded = np.concatenate([np.full(k - 1, x[0]), x])
    n = x.shape[0]
    return np.median(np.stack([padded[i:i + n] for i in range(k)]), axis=0)


def decode_smoothed(s: np.ndarray, delay_frames: int, on: float, off: float, min_event_frames: int,
                    gap_frames: int) -> list[tuple[int, int]]:
    """Events of one class as frame cells [a, b) from an already smoothed (T,) signal, by the
    decoder's rules 2-4 (hysteresis, gap merging, minimum duration) and its delay compensation:
    onsets and closed offsets move back by ``delay_frames`` (clamped at 0); an event still open at
    the end of the signal ends at its last frame."""
    n = s.shape[0]
    above, below = s >= on, s < off
    runs: list[list[int]] = []
    t = 0
    while t < n:
        starts = np.flatnonzero(above[t:])
        if starts.size == 0:
            break
        a = t + int(starts[0])
        ends = np.flatnonzero(below[a:])
        b = a + int(ends[0]) if ends.size else n
        if runs and a - runs[-1][1] < gap_frames:
            runs[-1][1] = b
        else:
            runs.append([a, b])
        t = b if b > a else a + 1
    out = []
    for a, b in runs:
        if b - a < min_event_frames:
            continue
        onset = max(a - delay_frames, 0)
        offset = n if b == n else b - delay_frames
        out.append((onset, offset))
    return out


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


@dataclass
class ClassTarget:
    """One class's validation reference: per file, reference events as (n, 2) onset/offset
    seconds and (T,) frame activity."""

    events: list[np.ndarray]
    frames: list[np.ndarray]

    @property
    def n_events(self) -> int:
        return int(sum(e.shape[0] for e in self.events))


def score(cells_per_file: Sequence[list[tuple[int, int]]], target: ClassTarget, hop_s: float,
          objective: str) -> float:
    """F1 of one class's decoded events over every validation file."""
    if objective in ("event_f1", "onset_f1"):
        offset_fraction = OFFSET_FRACTION if objective == "event_f1" else None
        tp = n_est = 0
        for cells, ref in zip(cells_per_file, target.events):
            est = np.array(cells, float).reshape(-1, 2) * hop_s
            n_est += est.shape[0]
            tp += event_matches(ref, est, COLLAR_S, offset_fraction)
        denom = n_est + target.n_events
        return 2.0 * tp / denom if denom else 0.0
    tp = fp = fn = 0
    for cells, ref in zip(cells_per_file, target.frames):
        pred = np.zeros(ref.shape[0], bool)
        for a, b in cells:
            pred[a:b] = True
        tp += int(np.sum(pred & ref))
        fp += int(np.sum(pred & ~ref))
        fn += int(np.sum(~pred & ref))
    denom = 2 * tp + fp + fn
    return 2.0 * tp / denom if denom else 0.0


# -------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class ClassDecoder:
    """One class's decoder settings and their validation score."""

    smoothing_frames: int = 1
    on: float = 0.5
    off: float = 0.5
    min_event_s: float = 0.0
    min_gap_s: float = 0.0
    score: float = 0.0


def tune_class(probs: Sequence[np.ndarray], target: ClassTarget, hop_s: float, objective: str = "event_f1",
               smoothing_grid: Sequence[int] = SMOOTHING_GRID, rounds: int = 2,
               min_event_grid_s: Sequence[float] = MIN_EVENT_GRID_S,
               min_gap_grid_s: Sequence[float] = MIN_GAP_GRID_S) -> ClassDecoder:
    """The best decoder for one class: probs are its (T,) probabilities per validation file. The
    search starts from (0.5, 0.5, no smoothing) at the first value of each duration grid."""
    def evaluate(k: int, smoothed: list[np.ndarray], on: float, off: float, min_event_s: float,
                 min_gap_s: float) -> float:
        cells = [decode_smoothed(s, (k - 1) // 2, on, off, max(1, seconds_to_frames(min_event_s, hop_s)),
                                 seconds_to_frames(min_gap_s, hop_s)) for s in smoothed]
        return score(cells, target, hop_s, objective)

    start_event_s, start_gap_s = min_event_grid_s[0], min_gap_grid_s[0]
    best = ClassDecoder(min_event_s=start_event_s, min_gap_s=start_gap_s,
                        score=evaluate(1, list(probs), 0.5, 0.5, start_event_s, start_gap_s))
    current = best
    for _ in range(rounds):
        improved = False
        for k in smoothing_grid:
            smoothed = [median_smooth(p, k) for p in probs]
            for on in ON_GRID:
                for drop in OFF_DROPS:
                    off = round(on - drop, 2)
                    if off < 0.05:
                        continue
                    value = evaluate(k, smoothed, on, off, current.min_event_s, current.min_gap_s)
                    if value > best.score + 1e-9:
                        best = ClassDecoder(k, on, off, current.min_event_s, current.min_gap_s, value)
                        improved = True
        smoothed = [median_smooth(p, best.smoothing_frames) for p in probs]
        for min_event_s in min_event_grid_s:
            for min_gap_s in min_gap_grid_s:
                value = evaluate(best.smoothing_frames, smoothed, best.on, best.off, min_event_s, min_gap_s)
                if value > best.score + 1e-9:
                    best = ClassDecoder(best.smoothing_frames, best.on, best.off, min_event_s, min_gap_s, value)
                    improved = True
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
                 min_gap_s: float | None = None, rounds: int = 2) -> tuple[DecoderConfig, list[dict]]:
    """Per-class decoder settings chosen on ``outputs`` (train.evaluate.predict's FileOutputs, or
    anything with ``probs`` (T, C), ``targets`` (T, C) and ``events``).
    ``min_event_s`` / ``min_gap_s`` fix that duration for every class instead of searching it;
    ``rounds`` bounds the coordinate-descent passes (fewer: faster, at most as good).
    A class without reference events keeps the defaults (0.5, no smoothing, the fixed or zero
    durations): there is nothing to tune it on. Returns the config and one row per class."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {OBJECTIVES}")
    max_delay = int(np.floor(max_smoothing_s / hop_s + 1e-9))
    grid = [k for k in SMOOTHING_GRID if (k - 1) // 2 <= max_delay]
    chosen, table = [], []
    for c, label in enumerate(labels):
        target = class_target(outputs, c, label)
        probs = [np.asarray(o.probs[:, c], np.float64) for o in outputs]
        durations = {"min_event_grid_s": MIN_EVENT_GRID_S if min_event_s is None else (min_event_s,),
                     "min_gap_grid_s": MIN_GAP_GRID_S if min_gap_s is None else (min_gap_s,)}
        default = tune_class(probs, target, hop_s, objective, smoothing_grid=(1,), rounds=0, **durations)
        best = tune_class(probs, target, hop_s, objective, grid, rounds, **durations) if target.n_events else default
        chosen.append(best)
        table.append({"class": c, "label": label, "smoothing_frames": best.smoothing_frames, "on": best.on,
                      "off": best.off, "min_event_s": best.min_event_s, "min_gap_s": best.min_gap_s,
                      f"{objective}_tuned": best.score, f"{objective}_default": default.score,
                      "reference_events": target.n_events})
    config = DecoderConfig(
        on_thresholds=tuple(d.on for d in chosen), off_thresholds=tuple(d.off for d in chosen),
        min_event_s=tuple(d.min_event_s for d in chosen), min_gap_s=tuple(d.min_gap_s for d in chosen),
        smoothing_frames=tuple(d.smoothing_frames for d in chosen))
    return config, table


def decoded_cells(probs: np.ndarray, hop_s: float, labels: Sequence[str], decoder: DecoderConfig) -> dict[str, list]:
    """Cells [a, b) per label of the real decoder on (T, C) probabilities (for checking the search)."""
    out: dict[str, list] = {label: [] for label in labels}
    for e in decode_offline(probs, labels, hop_s, decoder):
        out[e.label].append((int(round(e.onset_s / hop_s)), int(round(e.offset_s / hop_s))))
    return out


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    from train.data_sources import open_dataset
    from train.evaluate import predict

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
    p.add_argument("--min-event-s", type=float, help="fix every class's minimum event duration instead of tuning it")
    p.add_argument("--min-gap-s", type=float, help="fix every class's minimum gap instead of tuning it")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
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
    labels = ckpt.config.labels
    tuned, table = tune_decoder(outputs, ckpt.config.frontend.hop_s, labels, args.objective, args.max_smoothing_s,
                                args.min_event_s, args.min_gap_s)
    config = ckpt.config.replace(decoder=tuned)
    metadata = dict(ckpt.metadata, tuned_on=f"{args.data or args.val_data} split {args.split}",
                    tuning_objective=args.objective, tuning_max_smoothing_s=args.max_smoothing_s, tuning=table)
    save_checkpoint(Path(args.out), ckpt.model, config, metadata)
    key = args.objective
    print(f"{'label':>18}  {'median':>6} {'on':>5} {'off':>5} {'min ev':>6} {'min gap':>7}  {key} tuned / default")
    for row in table:
        print(f"{row['label']:>18}  {row['smoothing_frames']:6d} {row['on']:5.2f} {row['off']:5.2f} "
              f"{row['min_event_s']:6.2f} {row['min_gap_s']:7.2f}  {row[key + '_tuned']:.3f} / {row[key + '_default']:.3f}"
              + ("" if row["reference_events"] else "  (no validation events: defaults)"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
