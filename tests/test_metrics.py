"""Tests for rtsed.metrics: hand-computed frame counts, the frame-ER == sed_eval one-frame-segment-ER
cross-check that docs/reference.md promises, small known cases for sed_eval's segment/event metrics,
and PSDS scenario 1 on perfect and random scores."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rtsed.metrics import (
    FileEvent,
    event_scores,
    frame_probs_to_events,
    frame_scores,
    per_class_f1,
    per_class_scores,
    psds1,
    psds2,
    segment_scores,
)

HOP_S = 0.02
LABELS = ["alarm", "bird", "dog", "rain"]

# ------------------------------------------------------------------------------------------
# Frame-wise metrics, by hand
# ------------------------------------------------------------------------------------------

# 4 frames x 3 classes. Per frame (est vs ref):
#   t0: est {0,1} ref {0}    -> TP 1, FP 1        -> I 1
#   t1: est {2}   ref {0,1}  -> FN 2, FP 1        -> S 1, D 1
#   t2: est {0}   ref {2}    -> FP 1, FN 1        -> S 1   (0.5 counts as active: p >= 0.5)
#   t3: est {}    ref {}     -> nothing           (0.49 is below 0.5)
PROBS = np.array([[0.9, 0.6, 0.1],
                  [0.2, 0.1, 0.8],
                  [0.5, 0.0, 0.4],
                  [0.0, 0.0, 0.49]])
TARGETS = np.array([[1, 0, 0],
                    [1, 1, 0],
                    [0, 0, 1],
                    [0, 0, 0]], dtype=np.float32)


def test_frame_scores_hand_computed():
    s = frame_scores(PROBS, TARGETS)
    assert (s.tp, s.fp, s.fn) == (1, 3, 3)
    assert (s.substitutions, s.deletions, s.insertions, s.n_ref) == (2, 1, 1, 4)
    assert s.f1 == pytest.approx(2 * 1 / (2 * 1 + 3 + 3))  # 0.25
    assert s.error_rate == pytest.approx((2 + 1 + 1) / 4)  # 1.0
    assert s.precision == pytest.approx(1 / 4) and s.recall == pytest.approx(1 / 4)
    assert s.n_frames == 4 and s.params["threshold"] == 0.5


def test_frame_scores_per_class_threshold():
    # Class 2 at 0.3: t2 becomes a TP (its FP on class 0 is now an insertion), t3 an insertion.
    s = frame_scores(PROBS, TARGETS, threshold=[0.5, 0.5, 0.3])
    assert (s.tp, s.fp, s.fn) == (2, 4, 2)
    assert (s.substitutions, s.deletions, s.insertions, s.n_ref) == (1, 1, 3, 4)
    assert s.error_rate == pytest.approx(5 / 4)
    assert s.f1 == pytest.approx(4 / 10)
    assert s.threshold == (0.5, 0.5, 0.3)


def test_per_class_hand_computed():
    table = per_class_scores(PROBS, TARGETS, labels=["a", "b", "c"])
    assert [(c.label, c.tp, c.fp, c.fn, c.n_ref) for c in table] == [
        ("a", 1, 1, 1, 2), ("b", 0, 1, 1, 1), ("c", 0, 1, 1, 1)]
    assert table[0].f1 == pytest.approx(0.5) and table[0].error_rate == pytest.approx(1.0)
    np.testing.assert_allclose(per_class_f1(PROBS, TARGETS), [0.5, 0.0, 0.0])


def test_frame_scores_layouts_agree():
    rng = np.random.default_rng(0)
    probs = rng.random((3, 50, 5))
    targets = (rng.random((3, 50, 5)) < 0.3).astype(np.float32)
    batch = frame_scores(probs, targets)
    seqs = frame_scores([probs[0], probs[1, :20], probs[1, 20:], probs[2]],
                        [targets[0], targets[1, :20], targets[1, 20:], targets[2]])
    assert batch == seqs
    assert frame_scores(torch.from_numpy(probs), torch.from_numpy(targets).bool()) == batch
    # bf16 has no numpy dtype: it is widened, so only the rounding of p may change the counts.
    assert frame_scores(torch.from_numpy(probs).bfloat16(), targets).n_ref == batch.n_ref
    with pytest.raises(ValueError):
        frame_scores([probs[0]], [targets[0, :49]])
    with pytest.raises(ValueError):
        frame_scores(probs, targets, threshold=[0.5, 0.5])


def test_degenerate_cases():
    empty = frame_scores(np.zeros((10, 2)), np.zeros((10, 2)))
    assert empty.f1 == 0.0 and math.isnan(empty.error_rate) and math.isnan(empty.precision)
    silent = frame_scores(np.zeros((10, 2)), np.ones((10, 2)))
    assert silent.f1 == 0.0 and silent.error_rate == 1.0 and silent.deletions == 20


def test_frame_probs_to_events_frame_time_convention():
    p = np.zeros((10, 2))
    p[2:5, 0] = 0.9       # cells [2, 5) -> [0.04, 0.10)
    p[7:, 0] = 0.6        # run to the end -> [0.14, 0.20)
    p[0:1, 1] = 0.5       # first cell, exactly at threshold -> [0, 0.02)
    ev = frame_probs_to_events(p, HOP_S, ["a", "b"])
    assert ev == [(0.0, HOP_S, "b"), (2 * HOP_S, 5 * HOP_S, "a"), (7 * HOP_S, 10 * HOP_S, "a")]
    assert frame_probs_to_events(p, HOP_S, ["a", "b"], threshold=[0.7, 0.7]) == [
        (2 * HOP_S, 5 * HOP_S, "a")]


# ------------------------------------------------------------------------------------------
# Cross-check: frame ER/F1 == sed_eval segment-based with one frame per segment
# ------------------------------------------------------------------------------------------


def rasterise(events, n_frames, hop_s, labels):
    """Frame targets (T, C) with docs/conventions.md's rule: cell [t*hop, (t+1)*hop) is active if the event
    [onset, offset) overlaps it, i.e. t in [floor(onset/hop), ceil(offset/hop)). Times within 1e-6
    of a cell boundary are snapped onto it first, so that 7 * 0.02 counts as the boundary 7."""
    def cell(x):
        r = x / hop_s
        return round(r) if abs(r - round(r)) < 1e-6 else r

    y = np.zeros((n_frames, len(labels)), dtype=np.float32)
    for onset, offset, label in events:
        y[math.floor(cell(onset)):math.ceil(cell(offset)), labels.index(label)] = 1
    return y


def random_events(rng, duration_s, on_grid, min_s=0.01):
    """Polyphonic events: each class gets a few events (overlapping other classes and, sometimes,
    its own). Off the grid, lengths are uniform in [min_s, 3 s]."""
    events = []
    for label in LABELS:
        for _ in range(rng.integers(0, 6)):
            if on_grid:
                a = int(rng.integers(0, round(duration_s / HOP_S) - 1))
                b = min(a + int(rng.integers(1, 150)), round(duration_s / HOP_S))
                events.append((a * HOP_S, b * HOP_S, label))
            else:
                a = rng.uniform(0, duration_s - 0.05)
                events.append((a, min(a + rng.uniform(min_s, 3.0), duration_s), label))
    return events


@pytest.mark.parametrize("on_grid", [False, True], ids=["continuous-times", "grid-times"])
def test_frame_metrics_equal_sed_eval_one_frame_segments(on_grid):
    pytest.importorskip("sed_eval")
    rng = np.random.default_rng(1 + on_grid)
    ref_events, est_events, targets, probs = [], [], [], []
    for i, duration_s in enumerate([7.0, 12.34, 4.5]):
        n = math.ceil(duration_s / HOP_S - 1e-9)
        name = f"file{i}.wav"
        ref = random_events(rng, duration_s, on_grid)
        est = random_events(rng, duration_s, on_grid) + ref[::2]   # some hits, many errors
        ref_events += [(name, *e) for e in ref]
        est_events += [(name, *e) for e in est]
        targets.append(rasterise(ref, n, HOP_S, LABELS))
        probs.append(rasterise(est, n, HOP_S, LABELS))
    ours = frame_scores(probs, targets)
    theirs = segment_scores(ref_events, est_events, LABELS, segment_s=HOP_S)
    c = theirs.counts
    assert (c["Ntp"], c["Nfp"], c["Nfn"], c["Nref"]) == (ours.tp, ours.fp, ours.fn, ours.n_ref)
    assert (c["S"], c["D"], c["I"]) == (ours.substitutions, ours.deletions, ours.insertions)
    assert ours.substitutions > 0 and ours.deletions > 0 and ours.insertions > 0
    assert abs(ours.error_rate - theirs.error_rate) < 1e-9
    assert abs(ours.f1 - theirs.f1) < 1e-9
    for ours_c, label in zip(per_class_scores(probs, targets, labels=LABELS), LABELS):
        if ours_c.n_ref > 0:  # sed_eval's recall (so F1) is nan for a class never in the reference
            assert abs(ours_c.f1 - theirs.per_class[label].f1) < 1e-9


def test_decoded_frames_equal_sed_eval_one_frame_segments():
    """The path a report takes: frame decisions -> frame_probs_to_events -> sed_eval."""
    pytest.importorskip("sed_eval")
    rng = np.random.default_rng(3)
    ref_events, est_events, targets, probs = [], [], [], []
    for i, n in enumerate([400, 617]):
        name = f"f{i}"
        ref = random_events(rng, n * HOP_S, on_grid=False)
        p = rng.random((n, len(LABELS))) ** 3          # sparse-ish activity, many short runs
        ref_events += [(name, *e) for e in ref]
        est_events += [FileEvent(name, *e) for e in frame_probs_to_events(p, HOP_S, LABELS, 0.5)]
        targets.append(rasterise(ref, n, HOP_S, LABELS))
        probs.append(p)
    ours = frame_scores(probs, targets)
    theirs = segment_scores(ref_events, est_events, LABELS, segment_s=HOP_S)
    assert theirs.counts["Nsys"] == ours.tp + ours.fp
    assert abs(ours.error_rate - theirs.error_rate) < 1e-9
    assert abs(ours.f1 - theirs.f1) < 1e-9


# ------------------------------------------------------------------------------------------
# Segment- and event-based metrics on known cases
# ------------------------------------------------------------------------------------------

REF = [("a.wav", 1.0, 3.0, "dog"), ("a.wav", 2.0, 2.5, "bird"), ("b.wav", 0.5, 4.0, "rain")]


def test_segment_and_event_scores_perfect():
    pytest.importorskip("sed_eval")
    # Every accepted event form: 4-tuple, FileEvent, attribute object (label=), DCASE dict.
    est = [FileEvent(*REF[0]),
           SimpleNamespace(filename="a.wav", onset_s=2.0, offset_s=2.5, label="bird", score=0.9),
           {"filename": "b.wav", "onset": 0.5, "offset": 4.0, "event_label": "rain"}]
    seg = segment_scores(REF, est, LABELS)
    assert (seg.f1, seg.error_rate) == (1.0, 0.0)
    assert seg.params["segment_s"] == 1.0 and seg.n_files == 2
    ev = event_scores(REF, est, LABELS)
    assert (ev.f1, ev.error_rate) == (1.0, 0.0)
    assert ev.params == {"metric": "event-based (sed_eval)", "collar_s": 0.2,
                         "evaluate_onset": True, "evaluate_offset": False,
                         "offset_fraction": 0.5, "matching": "optimal", "n_files": 2}
    assert "onset only" in ev.report


def test_segment_scores_known_case():
    pytest.importorskip("sed_eval")
    # ref [0.5, 2.5) covers 1 s segments 0, 1, 2; the estimate [1.2, 1.8) only segment 1.
    seg = segment_scores([("x", 0.5, 2.5, "dog")], [("x", 1.2, 1.8, "dog")], LABELS)
    assert seg.f1 == pytest.approx(2 * 1 / (2 * 1 + 0 + 2))
    assert seg.error_rate == pytest.approx(2 / 3)
    assert seg.counts["D"] == 2 and seg.per_class["dog"].n_ref == 3
    # An estimate ending exactly on a segment boundary does not touch the next segment.
    seg = segment_scores([("x", 0.0, 2.0, "dog")], [("x", 0.0, 2.0, "dog")], LABELS, segment_s=0.5)
    assert seg.counts["Nref"] == 4 and seg.error_rate == 0.0


def test_event_scores_collar():
    pytest.importorskip("sed_eval")
    ref = [("x", 1.0, 3.0, "dog")]
    inside = event_scores(ref, [("x", 1.15, 2.0, "dog")], LABELS)       # onset off by 150 ms
    assert (inside.f1, inside.error_rate) == (1.0, 0.0)
    outside = event_scores(ref, [("x", 1.25, 3.0, "dog")], LABELS)      # onset off by 250 ms
    assert outside.f1 == 0.0 and outside.error_rate == pytest.approx(2.0)  # 1 deletion + 1 insertion
    wrong = event_scores(ref, [("x", 1.1, 3.0, "bird")], LABELS)        # right time, wrong class
    assert wrong.error_rate == pytest.approx(1.0) and wrong.counts["Nsubs"] == 1
    wider = event_scores(ref, [("x", 1.25, 3.0, "dog")], LABELS, collar_s=0.3)
    assert wider.f1 == 1.0 and wider.params["collar_s"] == 0.3
    # With the offset condition, offset within max(collar, 50 % of 2 s) = 1 s of 3.0 s.
    assert event_scores(ref, [("x", 1.1, 2.5, "dog")], LABELS, evaluate_offset=True).f1 == 1.0
    assert event_scores(ref, [("x", 1.1, 1.5, "dog")], LABELS, evaluate_offset=True).f1 == 0.0


def test_unknown_label_and_missing_library(monkeypatch):
    pytest.importorskip("sed_eval")
    with pytest.raises(ValueError, match="not one of"):
        segment_scores([("x", 0.0, 1.0, "cat")], [], LABELS)
    # A system that outputs nothing: F1 0 (not sed_eval's default nan), like frame_scores.
    assert event_scores(REF, [], LABELS).f1 == 0.0
    assert segment_scores(REF, [], LABELS).f1 == 0.0 and segment_scores(REF, [], LABELS).error_rate == 1.0
    monkeypatch.setitem(sys.modules, "sed_eval", None)   # makes `import sed_eval` fail
    with pytest.raises(ImportError, match=r"rtsed\[train\]"):
        event_scores(REF, REF, LABELS)


# ------------------------------------------------------------------------------------------
# PSDS scenario 1
# ------------------------------------------------------------------------------------------


def _psds_case(rng, n_files=4, n_frames=500, on_grid=True, min_s=0.01):
    """Four files of 10 s: perfect frame scores (1 on the events, 0 elsewhere) and ground truth."""
    scores, gt = {}, []
    for i in range(n_files):
        name = f"s{i}.wav"
        events = random_events(rng, n_frames * HOP_S, on_grid=on_grid, min_s=min_s)
        gt += [(name, *e) for e in events]
        scores[name] = rasterise(events, n_frames, HOP_S, LABELS)
    return scores, gt


def test_psds1_perfect_random_and_one_class_missed():
    pytest.importorskip("sed_scores_eval")
    rng = np.random.default_rng(5)
    frames, gt = _psds_case(rng)
    perfect = psds1({f: (y, HOP_S, LABELS) for f, y in frames.items()}, gt)
    # Scores 1 exactly on the (grid-aligned) events, 0 elsewhere: TPR 1 from eFPR 0. Observed: 1.0.
    assert perfect.psds == pytest.approx(1.0, abs=1e-9)
    assert perfect.params["dtc_threshold"] == 0.7 and perfect.params["gtc_threshold"] == 0.7
    assert perfect.params["alpha_st"] == 1.0 and perfect.params["alpha_ct"] == 0.0
    assert perfect.params["max_efpr"] == 100.0 and perfect.params["cttc_threshold"] is None
    assert perfect.params["unit_of_time"] == "hour"
    assert perfect.n_files == 4 and perfect.duration_s == pytest.approx(4 * 500 * HOP_S)
    assert perfect.n_gt_merged > 0   # same-class overlaps in random_events were merged

    # i.i.d. frame noise fragments every detection: nothing passes the 0.7 criteria. Observed: 0.0.
    noise = psds1({f: (rng.random(y.shape), HOP_S, LABELS) for f, y in frames.items()}, gt)
    assert noise.psds < 0.05

    # Three classes perfect, one noise: per-class PSDS 1, 1, 1, 0 and alpha_st = 1 gives
    # mean - std = 0.75 - sqrt(3)/4 (the ground truth may also come as a dict).
    by_file = {}
    for f, a, b, lab in gt:
        by_file.setdefault(f, []).append((a, b, lab))
    mixed = {}
    for f, y in frames.items():
        y = y.copy()
        y[:, 3] = rng.random(len(y))
        mixed[f] = (y, HOP_S, LABELS)
    one_missed = psds1(mixed, by_file)
    assert one_missed.per_class == pytest.approx({"alarm": 1.0, "bird": 1.0, "dog": 1.0, "rain": 0.0})
    assert one_missed.psds == pytest.approx(0.75 - math.sqrt(3) / 4, abs=1e-6)


def test_psds1_off_grid_events():
    """Events off the frame grid: the rasterised detection overhangs an event by < 1 hop at each
    end. Events of >= 0.2 s still pass dtc 0.7 (0.2 / 0.24 > 0.7); a 10 ms event cannot."""
    pytest.importorskip("sed_scores_eval")
    frames, gt = _psds_case(np.random.default_rng(9), on_grid=False, min_s=0.2)
    assert psds1({f: (y, HOP_S, LABELS) for f, y in frames.items()}, gt).psds == pytest.approx(1.0)
    # One 10 ms "rain" event in a file of its own, rasterised onto one 20 ms frame: 50 % overlap.
    frames["short.wav"] = rasterise([(0.505, 0.515, "rain")], 100, HOP_S, LABELS)
    gt.append(("short.wav", 0.505, 0.515, "rain"))
    r = psds1({f: (y, HOP_S, LABELS) for f, y in frames.items()}, gt)
    assert r.per_class["alarm"] == pytest.approx(1.0) and r.per_class["rain"] < 1.0
    assert r.psds < 1.0


def test_psds2_loose_localisation_passes_what_psds1_refuses():
    """Scenario 2's detection and ground-truth criteria are 0.1, not 0.7: a 10 ms event rasterised
    onto a 20 ms frame (50 % of the detection on the event) fails PSDS1 but passes PSDS2."""
    pytest.importorskip("sed_scores_eval")
    frames, gt = _psds_case(np.random.default_rng(9), on_grid=False, min_s=0.2)
    frames["short.wav"] = rasterise([(0.505, 0.515, "rain")], 100, HOP_S, LABELS)
    gt.append(("short.wav", 0.505, 0.515, "rain"))
    scores = {f: (y, HOP_S, LABELS) for f, y in frames.items()}
    one, two = psds1(scores, gt), psds2(scores, gt)
    assert one.per_class["rain"] < 1.0 and two.per_class["rain"] == pytest.approx(1.0)
    assert two.scenario == 2 and two.params["metric"] == "PSDS scenario 2 (sed_scores_eval)"
    assert two.params["dtc_threshold"] == 0.1 and two.params["cttc_threshold"] == 0.3
    assert two.params["alpha_ct"] == 0.5
