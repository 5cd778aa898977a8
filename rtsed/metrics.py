"""Scoring detections: frame-wise F1/ER (the paper's metric), segment- and event-based metrics
(sed_eval), and PSDS scenarios 1 and 2 (sed_scores_eval).

The paper (Drossos et al. 2020, after Cakir et al. 2017) scores frame decisions:

* binarise probabilities at 0.5 (``p >= threshold``, as the authors' ``y_hat.ge(0.5)``);
* flatten every frame of every sequence into rows of C classes;
* F1 = 2TP / (2TP + FP + FN), counts summed over all rows and classes (micro);
* ER = (S + D + I) / N with, per frame t, S_t = min(FN_t, FP_t), D_t = max(0, FN_t - FP_t),
  I_t = max(0, FP_t - FN_t), and N = number of active reference labels.

That ER is sed_eval's segment-based ER with one frame per segment, provided the frame targets
follow the frame-time convention (docs/conventions.md: an event [onset_s, offset_s) activates every cell
[t*hop, (t+1)*hop) it overlaps); tests/test_metrics.py checks that equality.

DCASE practice reports more, computed here with the reference libraries, imported lazily so that
inference never needs them: segment-based F1/ER on 1 s segments, event-based F1/ER with a 200 ms
onset collar, and PSDS scenario 1. ``pip install 'rtsed[train]'`` brings them (sed_eval,
sed_scores_eval, and setuptools<81 because sed_eval -> dcase_util imports ``pkg_resources``).

Events are ``(filename, onset_s, offset_s, event_label)``: a 4-tuple, a :class:`FileEvent`, any
object with those attributes (``label`` is accepted for ``event_label``), or a DCASE-style mapping
with keys ``filename``, ``onset``, ``offset``, ``event_label``. Times are seconds from the file's
first sample. Every result carries the parameters it was computed with (``.params``) so that a
report can print them next to the numbers.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "FileEvent",
    "FrameScores",
    "ClassFrameScores",
    "ClassScores",
    "SegmentScores",
    "EventScores",
    "PSDSScores",
    "frame_scores",
    "per_class_scores",
    "per_class_f1",
    "frame_probs_to_events",
    "segment_scores",
    "event_scores",
    "psds",
    "psds1",
    "psds2",
    "merge_overlaps",
]

_INSTALL_HINT = (
    "pip install 'rtsed[train]' (it brings sed_eval, sed_scores_eval and setuptools<81; "
    "sed_eval imports dcase_util, which imports pkg_resources, gone from setuptools >= 81)"
)


# --------------------------------------------------------------------------------------------
# Frame-wise metrics (numpy only)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameScores:
    """Frame-wise micro scores over all frames and classes (docs/reference.md "Metrics").

    Counts are label-cells (frame x class). ``error_rate`` is nan when ``n_ref`` is 0 (undefined);
    ``precision`` / ``recall`` are nan when their denominator is 0 (as in sed_eval); ``f1`` is 0
    when there is nothing to score at all (as in the authors' code).
    """

    f1: float
    error_rate: float
    precision: float
    recall: float
    tp: int
    fp: int
    fn: int
    substitutions: int
    deletions: int
    insertions: int
    n_ref: int
    n_frames: int = 0
    threshold: float | tuple[float, ...] = 0.5

    @property
    def params(self) -> dict[str, Any]:
        return {"metric": "frame-wise (micro)", "threshold": self.threshold,
                "rule": "p >= threshold", "n_frames": self.n_frames}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ClassFrameScores:
    """Frame-wise scores of one class. ``error_rate`` = (FN + FP) / N_c, as sed_eval's class-wise
    ER (no substitutions within one class); nan when the class never occurs in the reference."""

    label: str
    f1: float
    precision: float
    recall: float
    error_rate: float
    tp: int
    fp: int
    fn: int
    n_ref: int


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like or a torch tensor (without importing torch)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach().cpu()
        if t.is_floating_point():
            t = t.float()  # bf16/fp16 -> fp32: numpy has no bf16
        return t.numpy()
    return np.asarray(x)


def _as_rows(x: Any, name: str) -> tuple[np.ndarray, list[int] | None]:
    """(..., T, C) array or a list of (T_i, C) arrays -> ((N, C) rows, per-sequence lengths)."""
    # A list of 2-D arrays/tensors is a list of sequences; any other list is one nested array.
    if isinstance(x, (list, tuple)) and x and all(getattr(s, "ndim", None) == 2 for s in x):
        parts = [_to_numpy(s) for s in x]
        if len({p.shape[1] for p in parts}) != 1:
            raise ValueError(f"{name}: sequences disagree on C: {[p.shape for p in parts]}")
        return np.concatenate(parts, axis=0), [p.shape[0] for p in parts]
    a = _to_numpy(x)
    if a.ndim < 2:
        raise ValueError(f"{name}: expected (..., T, C) or a list of (T_i, C), got shape {a.shape}")
    return a.reshape(-1, a.shape[-1]), None


def _threshold_vector(threshold: Any, n_classes: int) -> np.ndarray:
    th = np.asarray(_to_numpy(threshold), dtype=np.float64)
    if th.ndim == 0:
        return np.full(n_classes, float(th))
    if th.shape != (n_classes,):
        raise ValueError(f"threshold must be a scalar or ({n_classes},), got shape {th.shape}")
    return th


def _decisions(probs: Any, targets: Any, threshold: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (estimated (N, C) bool, reference (N, C) bool, threshold (C,))."""
    p, p_lens = _as_rows(probs, "probs")
    y, y_lens = _as_rows(targets, "targets")
    if p_lens is not None and y_lens is not None and p_lens != y_lens:
        raise ValueError(f"sequence lengths differ: probs {p_lens}, targets {y_lens}")
    if p.shape != y.shape:
        raise ValueError(f"probs rows {p.shape} != targets rows {y.shape}")
    th = _threshold_vector(threshold, p.shape[1])
    # Targets are 0/1 (float or bool); >= 0.5 also takes soft-but-binary labels safely.
    return p >= th, y >= 0.5, th


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


def frame_scores(probs: Any, targets: Any, threshold: Any = 0.5) -> FrameScores:
    """Frame-wise F1 and ER of the paper.

    probs:     (..., T, C) probabilities (after the sigmoid; not logits), or a list of (T_i, C)
               arrays for sequences of different lengths. numpy arrays or torch tensors.
    targets:   same layout as ``probs``, 0/1 (float or bool).
    threshold: scalar or (C,) per-class thresholds; a label is active where ``p >= threshold``.
    """
    est, ref, th = _decisions(probs, targets, threshold)
    tp_c = est & ref
    fp_c = est & ~ref
    fn_c = ~est & ref
    tp, fp, fn = int(tp_c.sum()), int(fp_c.sum()), int(fn_c.sum())
    # Per-frame counts over classes: S pairs a miss with a false alarm in the same frame.
    fp_t = fp_c.sum(axis=1, dtype=np.int64)
    fn_t = fn_c.sum(axis=1, dtype=np.int64)
    s = int(np.minimum(fn_t, fp_t).sum())
    d = int(np.maximum(0, fn_t - fp_t).sum())
    i = int(np.maximum(0, fp_t - fn_t).sum())
    n_ref = int(ref.sum())
    den = 2 * tp + fp + fn
    thr = float(th[0]) if np.all(th == th[0]) else tuple(float(v) for v in th)
    return FrameScores(
        f1=2 * tp / den if den else 0.0,
        error_rate=_ratio(s + d + i, n_ref),
        precision=_ratio(tp, tp + fp),
        recall=_ratio(tp, tp + fn),
        tp=tp, fp=fp, fn=fn, substitutions=s, deletions=d, insertions=i, n_ref=n_ref,
        n_frames=int(ref.shape[0]), threshold=thr,
    )


def per_class_scores(
    probs: Any, targets: Any, threshold: Any = 0.5, labels: Sequence[str] | None = None
) -> list[ClassFrameScores]:
    """Frame-wise scores per class, in output order. Inputs as :func:`frame_scores`;
    ``labels`` names the C classes (default "0", "1", ...)."""
    est, ref, _ = _decisions(probs, targets, threshold)
    n_classes = ref.shape[1]
    labels = [str(c) for c in range(n_classes)] if labels is None else list(labels)
    if len(labels) != n_classes:
        raise ValueError(f"{len(labels)} labels for {n_classes} classes")
    tp = (est & ref).sum(axis=0)
    fp = (est & ~ref).sum(axis=0)
    fn = (~est & ref).sum(axis=0)
    out = []
    for c, label in enumerate(labels):
        den = 2 * tp[c] + fp[c] + fn[c]
        out.append(ClassFrameScores(
            label=label,
            f1=float(2 * tp[c] / den) if den else 0.0,
            precision=_ratio(tp[c], tp[c] + fp[c]),
            recall=_ratio(tp[c], tp[c] + fn[c]),
            error_rate=_ratio(fn[c] + fp[c], tp[c] + fn[c]),
            tp=int(tp[c]), fp=int(fp[c]), fn=int(fn[c]), n_ref=int(tp[c] + fn[c]),
        ))
    return out


def per_class_f1(probs: Any, targets: Any, threshold: Any = 0.5) -> np.ndarray:
    """(C,) frame-wise F1 per class (0 for a class never predicted nor present)."""
    return np.array([s.f1 for s in per_class_scores(probs, targets, threshold)])


def frame_probs_to_events(
    probs: Any, hop_s: float, labels: Sequence[str], threshold: Any = 0.5
) -> list[tuple[float, float, str]]:
    """Frame decisions -> events, with the frame-time convention of docs/conventions.md.

    probs: (T, C) probabilities of one file; hop_s: frame step in seconds; labels: C names;
    threshold: scalar or (C,). A run of active cells [a, b) becomes (a * hop_s, b * hop_s, label).
    No smoothing, no minimum duration: this is what the frame metric sees, not the decoder.
    Returns events sorted by onset, then by class order.
    """
    p = _to_numpy(probs)
    if p.ndim != 2 or p.shape[1] != len(labels):
        raise ValueError(f"probs must be (T, {len(labels)}), got {p.shape}")
    active = p >= _threshold_vector(threshold, p.shape[1])
    # Pad with inactive cells so that every run has a rising and a falling edge.
    edges = np.diff(np.pad(active.astype(np.int8), ((1, 1), (0, 0))), axis=0)
    events = []
    for c, label in enumerate(labels):
        starts = np.flatnonzero(edges[:, c] == 1)
        stops = np.flatnonzero(edges[:, c] == -1)
        events += [(a * hop_s, b * hop_s, c, label) for a, b in zip(starts.tolist(), stops.tolist())]
    events.sort(key=lambda e: (e[0], e[2]))
    return [(on, off, label) for on, off, _, label in events]


# --------------------------------------------------------------------------------------------
# Event lists
# --------------------------------------------------------------------------------------------


class FileEvent(NamedTuple):
    """One annotated or detected event of one file (the columns of a DCASE TSV)."""

    filename: str
    onset_s: float
    offset_s: float
    event_label: str


def _as_event(e: Any) -> FileEvent:
    if isinstance(e, Mapping):
        return FileEvent(str(e["filename"]), float(e.get("onset", e.get("onset_s"))),
                         float(e.get("offset", e.get("offset_s"))),
                         str(e.get("event_label", e.get("label"))))
    if hasattr(e, "filename") and hasattr(e, "onset_s"):
        label = getattr(e, "event_label", None)
        label = getattr(e, "label") if label is None else label
        return FileEvent(str(e.filename), float(e.onset_s), float(e.offset_s), str(label))
    if isinstance(e, (tuple, list)) and len(e) == 4:
        return FileEvent(str(e[0]), float(e[1]), float(e[2]), str(e[3]))
    raise TypeError(f"cannot read an event (filename, onset_s, offset_s, event_label) from {e!r}")


def _by_file(events: Iterable[Any], labels: Sequence[str], name: str) -> dict[str, list[FileEvent]]:
    known = set(labels)
    out: dict[str, list[FileEvent]] = {}
    for e in events:
        ev = _as_event(e)
        if ev.event_label not in known:
            raise ValueError(f"{name}: label {ev.event_label!r} is not one of {list(labels)}")
        if not ev.offset_s >= ev.onset_s:
            raise ValueError(f"{name}: offset before onset in {ev}")
        out.setdefault(ev.filename, []).append(ev)
    return out


def _import(module: str, caller: str):
    """Import a metrics library lazily, with an error that says what to install."""
    try:
        with warnings.catch_warnings():
            # dcase_util's `import pkg_resources` warns on every import; the user cannot act on it.
            warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
            return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"rtsed.metrics.{caller} needs {module.split('.')[0]}: {_INSTALL_HINT}") from e


@dataclass(frozen=True)
class ClassScores:
    """Per-class scores from sed_eval. A class the system never outputs gets precision 0 and
    F1 0; a class absent from the reference gets recall and error_rate nan."""

    f1: float
    precision: float
    recall: float
    error_rate: float
    n_ref: int
    n_sys: int


def _class_table(metrics: Any, labels: Sequence[str]) -> dict[str, ClassScores]:
    cw = metrics.results_class_wise_metrics()
    return {
        lab: ClassScores(
            f1=float(cw[lab]["f_measure"]["f_measure"]),
            precision=float(cw[lab]["f_measure"]["precision"]),
            recall=float(cw[lab]["f_measure"]["recall"]),
            # sed_eval divides by Nref + eps: a class absent from the reference gets ~1e15.
            error_rate=float(cw[lab]["error_rate"]["error_rate"]) if cw[lab]["count"]["Nref"] else math.nan,
            n_ref=int(cw[lab]["count"]["Nref"]),
            n_sys=int(cw[lab]["count"]["Nsys"]),
        )
        for lab in labels
    }


def _summary(metrics: Any, labels: Sequence[str]) -> dict[str, Any]:
    """Overall scores, raw counts, per-class table and text report of a sed_eval metrics object."""
    with warnings.catch_warnings():
        # nanmean over classes that are all nan (e.g. no class ever output) warns; the nan stays.
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
        avg = metrics.results_class_wise_average_metrics()
        report = str(metrics)
    f = metrics.overall_f_measure()
    er = metrics.overall_error_rate()
    return dict(
        f1=float(f["f_measure"]), precision=float(f["precision"]), recall=float(f["recall"]),
        error_rate=float(er["error_rate"]) if metrics.overall["Nref"] else math.nan,
        substitution_rate=float(er["substitution_rate"]),
        deletion_rate=float(er["deletion_rate"]), insertion_rate=float(er["insertion_rate"]),
        macro_f1=float(avg["f_measure"]["f_measure"]),
        # sed_eval's raw counts (Ntp, Nfp, Nfn, Nref, Nsys and S/D/I or Nsubs), as ints.
        counts={k: int(v) for k, v in metrics.overall.items() if k != "ER"},
        per_class=_class_table(metrics, labels), report=report,
    )


def _dcase_dicts(events: list[FileEvent], shift_s: float = 0.0) -> list[dict[str, Any]]:
    return [{"filename": e.filename, "event_label": e.event_label,
             # shift_s moves boundaries inwards; never invert a (very) short event.
             "onset": e.onset_s + shift_s if e.offset_s - e.onset_s > 2 * shift_s else e.onset_s,
             "offset": e.offset_s - shift_s if e.offset_s - e.onset_s > 2 * shift_s else e.offset_s}
            for e in events]


@dataclass(frozen=True)
class SegmentScores:
    """sed_eval segment-based metrics (micro over segments and classes; macro_f1 averages
    classes). ``report`` is sed_eval's own text report."""

    f1: float
    error_rate: float
    precision: float
    recall: float
    substitution_rate: float
    deletion_rate: float
    insertion_rate: float
    macro_f1: float
    counts: dict[str, int]
    per_class: dict[str, ClassScores]
    segment_s: float
    boundary_tolerance_s: float
    n_files: int
    evaluated_length_s: float
    report: str = field(default="", repr=False)

    @property
    def params(self) -> dict[str, Any]:
        return {"metric": "segment-based (sed_eval)", "segment_s": self.segment_s,
                "boundary_tolerance_s": self.boundary_tolerance_s, "n_files": self.n_files,
                "evaluated_length_s": self.evaluated_length_s}


def segment_scores(
    reference_events: Iterable[Any],
    estimated_events: Iterable[Any],
    labels: Sequence[str],
    segment_s: float = 1.0,
    durations: Mapping[str, float] | None = None,
) -> SegmentScores:
    """Segment-based F1/ER via ``sed_eval.sound_event.SegmentBasedMetrics``.

    reference_events, estimated_events: events (see the module docstring), any files, any order.
    labels: the class names to score. segment_s: segment length in seconds (DCASE: 1.0).
    durations: optional {filename: seconds}; files listed here are scored even without events
    (it sets sed_eval's evaluated length; F1/ER do not depend on trailing empty segments).

    sed_eval maps an event to segments floor(onset / seg) .. ceil(offset / seg) - 1, the same
    overlap rule as docs/conventions.md, but in floating point 7 * 0.02 / 0.02 is 7.000000000000001 and
    an offset exactly on a boundary would claim one segment more. Boundaries are therefore moved
    inwards by ``boundary_tolerance_s`` = 1e-6 * segment_s (20 ns at one frame of 20 ms) before
    scoring: an event that ends exactly where a segment begins does not touch that segment.
    """
    sed_eval = _import("sed_eval", "segment_scores")
    labels = list(labels)
    ref = _by_file(reference_events, labels, "reference_events")
    est = _by_file(estimated_events, labels, "estimated_events")
    files = sorted(set(ref) | set(est) | set(durations or {}))
    tol = 1e-6 * float(segment_s)
    metrics = sed_eval.sound_event.SegmentBasedMetrics(labels, time_resolution=float(segment_s))
    # A system that outputs nothing scores precision 0 (F1 0), not nan; as frame_scores does.
    # (SegmentBasedMetrics.__init__ does not take this option, so set it on the instance.)
    metrics.empty_system_output_handling = "zero_score"
    for f in files:
        if durations is not None and f in durations:
            length = float(durations[f])
        else:  # sed_eval's default, taken before the inward shift: the last offset
            length = max(e.offset_s for e in ref.get(f, []) + est.get(f, []))
        metrics.evaluate(_dcase_dicts(ref.get(f, []), tol), _dcase_dicts(est.get(f, []), tol),
                         evaluated_length_seconds=length)
    return SegmentScores(
        **_summary(metrics, labels), segment_s=float(segment_s), boundary_tolerance_s=tol,
        n_files=metrics.evaluated_files, evaluated_length_s=float(metrics.evaluated_length_seconds),
    )


@dataclass(frozen=True)
class EventScores:
    """sed_eval event-based metrics. An estimate matches a reference event of the same class
    when its onset is within ``collar_s`` (and, if ``evaluate_offset``, its offset within
    max(collar_s, offset_fraction * reference length))."""

    f1: float
    error_rate: float
    precision: float
    recall: float
    substitution_rate: float
    deletion_rate: float
    insertion_rate: float
    macro_f1: float
    counts: dict[str, int]
    per_class: dict[str, ClassScores]
    collar_s: float
    evaluate_onset: bool
    evaluate_offset: bool
    offset_fraction: float
    matching: str
    n_files: int
    report: str = field(default="", repr=False)

    @property
    def params(self) -> dict[str, Any]:
        return {"metric": "event-based (sed_eval)", "collar_s": self.collar_s,
                "evaluate_onset": self.evaluate_onset, "evaluate_offset": self.evaluate_offset,
                "offset_fraction": self.offset_fraction, "matching": self.matching,
                "n_files": self.n_files}


def event_scores(
    reference_events: Iterable[Any],
    estimated_events: Iterable[Any],
    labels: Sequence[str],
    collar_s: float = 0.2,
    evaluate_offset: bool = False,
    offset_fraction: float = 0.5,
) -> EventScores:
    """Event-based F1/ER via ``sed_eval.sound_event.EventBasedMetrics``.

    Defaults: onset-only, 200 ms collar (evaluate_onset=True, evaluate_offset=False), optimal
    (graph) matching. ``evaluate_offset=True`` adds sed_eval's offset condition with
    percentage_of_length = ``offset_fraction``. Events as in :func:`segment_scores`.
    """
    sed_eval = _import("sed_eval", "event_scores")
    labels = list(labels)
    ref = _by_file(reference_events, labels, "reference_events")
    est = _by_file(estimated_events, labels, "estimated_events")
    metrics = sed_eval.sound_event.EventBasedMetrics(
        labels, evaluate_onset=True, evaluate_offset=bool(evaluate_offset),
        t_collar=float(collar_s), percentage_of_length=float(offset_fraction),
        event_matching_type="optimal", empty_system_output_handling="zero_score",
    )
    for f in sorted(set(ref) | set(est)):
        metrics.evaluate(_dcase_dicts(ref.get(f, [])), _dcase_dicts(est.get(f, [])))
    return EventScores(
        **_summary(metrics, labels), collar_s=float(collar_s), evaluate_onset=True,
        evaluate_offset=bool(evaluate_offset), offset_fraction=float(offset_fraction),
        matching="optimal", n_files=metrics.evaluated_files,
    )


# --------------------------------------------------------------------------------------------
# PSDS (threshold-independent)
# --------------------------------------------------------------------------------------------

# DCASE PSDS scenario 1 (tasks 4, 2021 on): localisation-focused, cross-triggers not penalised.
PSDS1_PARAMS: dict[str, Any] = {
    "dtc_threshold": 0.7, "gtc_threshold": 0.7, "cttc_threshold": None,
    "alpha_ct": 0.0, "alpha_st": 1.0, "max_efpr": 100.0, "unit_of_time": "hour",
}
# DCASE PSDS scenario 2: classification-focused (loose localisation), cross-triggers penalised.
PSDS2_PARAMS: dict[str, Any] = {
    "dtc_threshold": 0.1, "gtc_threshold": 0.1, "cttc_threshold": 0.3,
    "alpha_ct": 0.5, "alpha_st": 1.0, "max_efpr": 100.0, "unit_of_time": "hour",
}
PSDS_SCENARIOS = {1: PSDS1_PARAMS, 2: PSDS2_PARAMS}


@dataclass(frozen=True)
class PSDSScores:
    """PSDS: area under the PSD-ROC (effective TPR vs effective FPR per hour) up to max_efpr,
    divided by max_efpr; alpha_st = 1 subtracts the std of the per-class ROCs."""

    psds: float
    per_class: dict[str, float]
    efpr_per_hour: np.ndarray = field(repr=False)
    etpr: np.ndarray = field(repr=False)
    dtc_threshold: float = 0.7
    gtc_threshold: float = 0.7
    cttc_threshold: float | None = None
    alpha_ct: float = 0.0
    alpha_st: float = 1.0
    max_efpr: float = 100.0
    unit_of_time: str = "hour"
    n_files: int = 0
    duration_s: float = 0.0
    n_gt_merged: int = 0
    scenario: int = 1

    @property
    def params(self) -> dict[str, Any]:
        return {"metric": f"PSDS scenario {self.scenario} (sed_scores_eval)",
                **{k: getattr(self, k) for k in PSDS1_PARAMS},
                "n_files": self.n_files, "duration_s": self.duration_s,
                "n_gt_merged": self.n_gt_merged}


def psds1(
    scores_per_file: Mapping[str, tuple[Any, float, Sequence[str]]],
    ground_truth: Iterable[Any] | Mapping[str, Iterable[tuple[float, float, str]]],
    durations: Mapping[str, float] | None = None,
) -> PSDSScores:
    """PSDS scenario 1 (localisation-focused); see :func:`psds`."""
    return psds(scores_per_file, ground_truth, durations, scenario=1)


def psds2(
    scores_per_file: Mapping[str, tuple[Any, float, Sequence[str]]],
    ground_truth: Iterable[Any] | Mapping[str, Iterable[tuple[float, float, str]]],
    durations: Mapping[str, float] | None = None,
) -> PSDSScores:
    """PSDS scenario 2 (classification-focused, cross-triggers penalised); see :func:`psds`."""
    return psds(scores_per_file, ground_truth, durations, scenario=2)


def psds(
    scores_per_file: Mapping[str, tuple[Any, float, Sequence[str]]],
    ground_truth: Iterable[Any] | Mapping[str, Iterable[tuple[float, float, str]]],
    durations: Mapping[str, float] | None = None,
    scenario: int = 1,
) -> PSDSScores:
    """PSDS of DCASE scenario 1 or 2 (``PSDS_SCENARIOS``) via
    ``sed_scores_eval.intersection_based.psds``.

    scores_per_file: {filename: (probs (T, C), hop_s, labels)}; frame t scores the cell
        [t * hop_s, (t + 1) * hop_s) (docs/conventions.md frame time). All files must share the labels.
    ground_truth: events (see module docstring) or {filename: [(onset_s, offset_s, label), ...]};
        every scored file counts, with or without events. Overlapping or touching events of one
        class in one file are merged first (sed_scores_eval rejects them); ``n_gt_merged`` counts them.
    durations: {filename: seconds}; default T * hop_s of each file's scores.
    """
    if scenario not in PSDS_SCENARIOS:
        raise ValueError(f"psds: scenario must be one of {sorted(PSDS_SCENARIOS)}, got {scenario!r}")
    params = PSDS_SCENARIOS[scenario]
    ssev = _import("sed_scores_eval", "psds")
    try:  # the module moved between sed_scores_eval releases
        from sed_scores_eval.base_modules.scores import create_score_dataframe
    except ImportError:  # pragma: no cover - newer layout
        from sed_scores_eval.utils.scores import create_score_dataframe

    if not scores_per_file:
        raise ValueError("psds: no scores")
    labels = None
    dataframes, lengths_s = {}, {}
    for f, (probs, hop_s, file_labels) in scores_per_file.items():
        file_labels = [str(x) for x in file_labels]
        if labels is None:
            labels = file_labels
        elif file_labels != labels:
            raise ValueError(f"psds: {f} has labels {file_labels}, others {labels}")
        p = np.asarray(_to_numpy(probs), dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != len(labels):
            raise ValueError(f"psds: scores of {f} must be (T, {len(labels)}), got {p.shape}")
        timestamps = np.arange(p.shape[0] + 1) * float(hop_s)
        dataframes[f] = create_score_dataframe(p, timestamps, labels)
        lengths_s[f] = float(timestamps[-1])

    gt: dict[str, list[tuple[float, float, str]]] = {f: [] for f in dataframes}
    if isinstance(ground_truth, Mapping):
        for f, evs in ground_truth.items():
            gt.setdefault(f, []).extend((float(a), float(b), str(c)) for a, b, c in evs)
    else:
        for f, evs in _by_file(ground_truth, labels, "ground_truth").items():
            gt.setdefault(f, []).extend((e.onset_s, e.offset_s, e.event_label) for e in evs)
    gt, n_merged = merge_overlaps(gt)
    missing = sorted(set(gt) - set(dataframes))
    if missing:
        raise ValueError(f"psds: ground truth for files without scores: {missing[:5]}")
    dur = {f: float(durations[f]) if durations is not None and f in durations else lengths_s[f]
           for f in dataframes}

    try:
        value, per_class, (etpr, efpr), _ = ssev.intersection_based.psds(
            scores=dataframes, ground_truth=gt, audio_durations=dur, **params,
        )
    except ValueError as e:
        # pandas >= 3 hands out read-only arrays (copy-on-write); sed_scores_eval 0.0.4's Cython
        # code needs writable buffers.
        if "read-only" in str(e):
            raise RuntimeError(f"psds: sed_scores_eval cannot run with this pandas: pin "
                               f"'pandas<3' ({_INSTALL_HINT})") from e
        raise
    return PSDSScores(
        psds=float(value), per_class={k: float(v) for k, v in per_class.items()},
        efpr_per_hour=np.asarray(efpr), etpr=np.asarray(etpr), **params,
        n_files=len(dataframes), duration_s=float(sum(dur.values())), n_gt_merged=n_merged, scenario=scenario,
    )


def merge_overlaps(
    gt: dict[str, list[tuple[float, float, str]]]
) -> tuple[dict[str, list[tuple[float, float, str]]], int]:
    """Union of overlapping or touching same-class events per file -> (ground truth, number of
    events absorbed). sed_scores_eval refuses such annotations; the union is also what the
    frame targets see."""
    out, n_merged = {}, 0
    for f, events in gt.items():
        merged: list[tuple[float, float, str]] = []
        for label in sorted({e[2] for e in events}):
            spans = sorted((a, b) for a, b, c in events if c == label)
            cur_a, cur_b = spans[0]
            for a, b in spans[1:]:
                if a <= cur_b:
                    cur_b, n_merged = max(cur_b, b), n_merged + 1
                else:
                    merged.append((cur_a, cur_b, label))
                    cur_a, cur_b = a, b
            merged.append((cur_a, cur_b, label))
        out[f] = sorted(merged)
    return out, n_merged
