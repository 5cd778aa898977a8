"""Decoder tuning: the per-class search finds the settings a class needs, its fast decoding equals
the real decoder's, and its event matcher equals sed_eval's."""

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rtsed.config import DecoderConfig
from rtsed.serve.decode import decode_offline
from train.annotations import Event
from train.tune import (
    COLLAR_S,
    OFFSET_FRACTION,
    decoded_cells,
    event_matches,
    tune_decoder,
)

from decode_reference import decode_smoothed, median_smooth  # tests/ is on sys.path

HOP = 0.02


def _outputs(probs, targets, labels):
    """FileOutput-like records: probabilities, frame targets and reference events."""
    events = []
    for c, label in enumerate(labels):
        active = np.concatenate([[0], targets[:, c] > 0, [0]]).astype(int)
        starts, ends = np.flatnonzero(np.diff(active) == 1), np.flatnonzero(np.diff(active) == -1)
        events += [Event("f", a * HOP, b * HOP, label) for a, b in zip(starts, ends)]
    return [SimpleNamespace(probs=probs, targets=targets, events=tuple(events))]


def test_tuning_finds_each_class_operating_point():
    rng = np.random.default_rng(0)
    t = 3000
    targets = np.zeros((t, 2), np.float32)
    for start in range(100, t, 400):
        targets[start:start + 150] = 1.0
    probs = np.empty((t, 2), np.float32)
    # Class 0: active frames sit at 0.30-0.40, silence at 0.0-0.2: only thresholds <= 0.3 find them.
    probs[:, 0] = np.where(targets[:, 0] > 0, rng.uniform(0.30, 0.40, t), rng.uniform(0.0, 0.2, t))
    # Class 1: a confident class; active at 0.8-1.0, silence 0.5-0.7 (0.5 would fire everywhere).
    probs[:, 1] = np.where(targets[:, 1] > 0, rng.uniform(0.8, 1.0, t), rng.uniform(0.5, 0.7, t))
    tuned, table = tune_decoder(_outputs(probs, targets, ["a", "b"]), HOP, ["a", "b"], "frame_f1")
    assert 0.2 <= tuned.on_thresholds[0] <= 0.30
    assert 0.7 <= tuned.on_thresholds[1] <= 0.8
    assert all(off <= on for on, off in zip(tuned.on_thresholds, tuned.off_thresholds))
    assert table[0]["frame_f1_tuned"] == 1.0 and table[0]["frame_f1_default"] == 0.0
    assert table[1]["frame_f1_tuned"] == 1.0 and table[1]["frame_f1_default"] < 0.8


def test_event_objective_smooths_away_flicker_that_splits_events():
    # Events of 3 s whose probabilities drop below every threshold for single frames: a plain
    # threshold reports each event in many pieces (low event F1); a median or a min gap mends them.
    rng = np.random.default_rng(1)
    t = 4000
    targets = np.zeros((t, 1), np.float32)
    for start in range(200, t - 200, 500):
        targets[start:start + 150] = 1.0
    probs = np.where(targets[:, 0] > 0, 0.9, 0.05)
    flicker = (targets[:, 0] > 0) & (rng.random(t) < 0.15)
    probs = np.where(flicker, 0.02, probs)[:, None]
    outputs = _outputs(probs, targets, ["a"])
    tuned, table = tune_decoder(outputs, HOP, ["a"], "event_f1")
    assert table[0]["event_f1_default"] < 0.5
    assert table[0]["event_f1_tuned"] == 1.0
    assert tuned.per_class("smoothing_frames", 1)[0] > 1 or tuned.per_class("min_gap_s", 1)[0] > 0
    # The chosen config through the real decoder reports each event once, at its onset.
    events = decode_offline(probs, ["a"], HOP, tuned)
    ref = [e for e in outputs[0].events]
    assert len(events) == len(ref)
    assert all(abs(e.onset_s - r.onset_s) <= COLLAR_S for e, r in zip(events, ref))


def test_smoothing_delay_is_bounded_by_the_latency_budget():
    rng = np.random.default_rng(2)
    t = 2000
    targets = np.zeros((t, 1), np.float32)
    targets[300:900] = 1
    probs = np.clip(targets + rng.normal(0, 0.45, targets.shape), 0, 1)
    tuned, _ = tune_decoder(_outputs(probs, targets, ["a"]), HOP, ["a"], "event_f1", max_smoothing_s=0.04)
    assert tuned.smoothing_delay_frames(1) <= 2


def test_a_class_without_validation_events_keeps_the_defaults():
    probs = np.full((500, 1), 0.7)
    tuned, table = tune_decoder(_outputs(probs, np.zeros((500, 1)), ["a"]), HOP, ["a"])
    assert tuned.on_thresholds == (0.5,) and tuned.smoothing_frames == (1,)
    assert table[0]["reference_events"] == 0


@st.composite
def _class_signals(draw):
    n = draw(st.integers(1, 80))
    levels = draw(st.lists(st.sampled_from([0.0, 0.2, 0.45, 0.5, 0.55, 0.8, 1.0]), min_size=n, max_size=n))
    k = draw(st.sampled_from([1, 3, 5, 7]))
    on = draw(st.sampled_from([0.3, 0.5, 0.7]))
    off = min(on, draw(st.sampled_from([0.2, 0.4, 0.5])))
    min_event_s = draw(st.sampled_from([0.0, 0.04, 0.1]))
    min_gap_s = draw(st.sampled_from([0.0, 0.04, 0.1]))
    return np.asarray(levels, float), k, on, off, min_event_s, min_gap_s


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_class_signals())
def test_fast_decoding_equals_the_real_decoder(case):
    x, k, on, off, min_event_s, min_gap_s = case
    config = DecoderConfig(on_thresholds=(on,), off_thresholds=(off,), min_event_s=min_event_s,
                           min_gap_s=min_gap_s, smoothing_frames=k)
    want = decoded_cells(x[:, None], HOP, ["a"], config)["a"]
    min_event = max(1, int(np.ceil(min_event_s / HOP - 1e-6)))
    gap = int(np.ceil(min_gap_s / HOP - 1e-6))
    got = decode_smoothed(median_smooth(x, k), (k - 1) // 2, on, off, min_event, gap)
    assert got == want


@st.composite
def _event_lists(draw):
    """Non-overlapping events of one class (as a reference or a decoder has them), (n, 2) seconds."""
    def events():
        cuts = sorted(set(round(v, 2) for v in draw(st.lists(st.floats(0, 20, allow_nan=False), max_size=12))))
        pairs = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
        return np.array(pairs, float).reshape(-1, 2)
    return events(), events(), draw(st.booleans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_event_lists())
@example((np.array([[1.0, 2.0]]), np.array([[1.0, 2.2]]), True))  # offset on the collar's edge: 2.2 - 2.0 > 0.2
def test_event_matching_equals_sed_eval(case):
    sed_eval = pytest.importorskip("sed_eval")
    ref, est, with_offset = case
    metric = sed_eval.sound_event.EventBasedMetrics(
        ["a"], evaluate_onset=True, evaluate_offset=with_offset, t_collar=COLLAR_S,
        percentage_of_length=OFFSET_FRACTION, event_matching_type="optimal")
    as_dicts = lambda ev: [{"filename": "f", "event_label": "a", "onset": a, "offset": b} for a, b in ev]  # noqa: E731
    metric.evaluate(as_dicts(ref), as_dicts(est))
    got = event_matches(ref, est, COLLAR_S, OFFSET_FRACTION if with_offset else None)
    assert got == metric.class_wise["a"]["Ntp"]


def test_fixed_durations_are_kept_for_every_class():
    rng = np.random.default_rng(3)
    targets = np.zeros((1500, 2), np.float32)
    targets[200:600, 0] = targets[900:1000, 1] = 1
    probs = np.clip(targets + rng.normal(0, 0.3, targets.shape), 0, 1)
    tuned, _ = tune_decoder(_outputs(probs, targets, ["a", "b"]), HOP, ["a", "b"], min_event_s=0.1, min_gap_s=0.2)
    assert tuned.min_event_s == (0.1, 0.1) and tuned.min_gap_s == (0.2, 0.2)


@st.composite
def _files_of_events(draw):
    """Reference and decoded events of one class in 1-4 files: (n, 2) seconds per file (reference)
    and (n, 2) frame cells per file (decoded), onsets landing on and around collar edges."""
    n_files = draw(st.integers(1, 4))
    def cells():
        starts = sorted(draw(st.lists(st.integers(0, 400), max_size=8)))
        return np.array([(a, a + draw(st.integers(1, 120))) for a in starts], float).reshape(-1, 2)
    refs = [cells() * HOP + draw(st.sampled_from([0.0, 0.01, -0.005])) for _ in range(n_files)]
    return refs, [cells() for _ in range(n_files)], draw(st.sampled_from(["event_f1", "onset_f1"]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_files_of_events())
def test_scoring_all_files_at_once_equals_matching_each_file(case):
    """score() matches every file's events in one graph; it must count what event_matches counts
    file by file (sed_eval's rule, tested above)."""
    from train.tune import ClassTarget, score

    refs, cells, objective = case
    target = ClassTarget([np.maximum(r, 0.0) for r in refs], [np.zeros(1, bool)] * len(refs))
    offset_fraction = OFFSET_FRACTION if objective == "event_f1" else None
    tp = sum(event_matches(r, c * HOP, COLLAR_S, offset_fraction) for r, c in zip(target.events, cells))
    n = target.n_events + sum(c.shape[0] for c in cells)
    assert score(cells, target, HOP, objective) == pytest.approx(2 * tp / n if n else 0.0)
