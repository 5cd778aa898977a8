"""Tests for rtsed.serve.decode: chunking invariance (notices included), an independent per-frame
reference decoder, hysteresis, minimum event/gap durations, smoothing and its delay compensation,
the frame-time convention, flush, threshold overrides, bad input, and the writers' exact text."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtsed.config import ConfigError, DecoderConfig
from rtsed.serve.decode import (
    EventDecoder,
    OnsetNotice,
    SoundEvent,
    decode_offline,
    event_to_json,
    smoothed_scores,
    write_audacity_labels,
    write_dcase_tsv,
)

HOP = 0.02
LABELS = ["dog", "bird", "rain"]


def one_class(values, **cfg):
    """(T, 1) probabilities and a one-class decoder."""
    p = np.asarray(values, dtype=np.float64)[:, None]
    return p, EventDecoder(["dog"], HOP, DecoderConfig(**cfg))


def run_all(dec, p, chunks=None):
    """Everything a stream yields: push outputs (chunked at `chunks` boundaries) + flush."""
    out = []
    bounds = [0, *(chunks or []), len(p)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out += dec.push(p[lo:hi])
    return out + dec.flush()


def events(items):
    return [e for e in items if isinstance(e, SoundEvent)]


def cells(items, hop=HOP):
    """SoundEvents as (label, a, b) frame cells."""
    return [(e.label, round(e.onset_s / hop), round(e.offset_s / hop)) for e in events(items)]


# ------------------------------------------------------------------------------------------
# A per-frame reference, written from the rules (not from the streaming code)
# ------------------------------------------------------------------------------------------


def _nframes(seconds, hop):
    x = seconds / hop
    return round(x) if abs(x - round(x)) < 1e-6 else math.ceil(x)


def reference_decode(p, labels, hop, cfg, compensate=True):
    T, C = p.shape
    on, off = cfg.thresholds(C)
    out = []
    for c in range(C):
        k = cfg.per_class("smoothing_frames", C)[c]
        D = (k - 1) // 2 if compensate else 0
        min_f = max(1, _nframes(cfg.per_class("min_event_s", C)[c], hop))
        gap_f = _nframes(cfg.per_class("min_gap_s", C)[c], hop)
        x = p[:, c]
        padded = np.concatenate([np.full(k - 1, x[0]), x])
        s = np.array([np.median(padded[t:t + k]) for t in range(T)])
        runs, state, start = [], False, 0
        for t in range(T):
            if not state and s[t] >= on[c]:
                state, start = True, t
            elif state and s[t] < off[c]:
                state = False
                runs.append([start, t, False])
        if state:
            runs.append([start, T, True])
        merged = []
        for r in runs:
            if merged and r[0] - merged[-1][1] < gap_f:
                merged[-1][1], merged[-1][2] = r[1], r[2]
            else:
                merged.append(r)
        for a, b, open_at_end in merged:
            if b - a < min_f:
                continue
            onset = max(a - D, 0) * hop
            offset = T * hop if open_at_end else (b - D) * hop
            out.append(SoundEvent(labels[c], onset, offset, float(s[a:b].mean())))
    return sorted(out, key=lambda e: (e.onset_s, e.label))


# ------------------------------------------------------------------------------------------
# Properties: chunking invariance, reference agreement, notice/event pairing
# ------------------------------------------------------------------------------------------


@st.composite
def streams(draw):
    T = draw(st.integers(1, 60))
    C = draw(st.integers(1, 3))
    # Coarse levels make runs, plateaus and exact-threshold hits likely; noise makes the rest.
    levels = draw(st.lists(st.sampled_from([0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]), min_size=T * C, max_size=T * C))
    p = np.asarray(levels, dtype=np.float64).reshape(T, C)
    if draw(st.booleans()):
        seed = draw(st.integers(0, 2**16))
        p = np.clip(p + np.random.default_rng(seed).normal(0, 0.15, p.shape), 0, 1)
    on = draw(st.lists(st.sampled_from([0.3, 0.5, 0.7]), min_size=C, max_size=C))
    off = [min(o, draw(st.sampled_from([0.2, 0.4, 0.5]))) for o in on]

    def one_or_per_class(values):
        # One value for every class, or one per class (the tuned checkpoints' form).
        if draw(st.booleans()):
            return draw(st.sampled_from(values))
        return tuple(draw(st.lists(st.sampled_from(values), min_size=C, max_size=C)))

    cfg = DecoderConfig(
        on_thresholds=tuple(on),
        off_thresholds=tuple(off),
        min_event_s=one_or_per_class([0.0, 0.02, 0.05, 0.1]),
        min_gap_s=one_or_per_class([0.0, 0.02, 0.06, 0.1]),
        smoothing_frames=one_or_per_class([1, 2, 3, 5]),
    )
    cuts = sorted(set(draw(st.lists(st.integers(0, T), max_size=8))))
    return p, LABELS[:C], cfg, cuts


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(streams())
def test_any_chunking_gives_the_same_notices_and_events(case):
    p, labels, cfg, cuts = case
    whole = run_all(EventDecoder(labels, HOP, cfg), p)
    chunked = run_all(EventDecoder(labels, HOP, cfg), p, cuts)
    one_by_one = run_all(EventDecoder(labels, HOP, cfg), p, list(range(1, len(p))))
    assert chunked == whole  # exact: times, scores and order, notices included
    assert one_by_one == whole


@FAST
@given(streams())
def test_streaming_decoder_matches_the_per_frame_reference(case):
    p, labels, cfg, _ = case
    got = decode_offline(p, labels, HOP, cfg)
    want = reference_decode(p, labels, HOP, cfg)
    assert [(e.label, e.onset_s, e.offset_s) for e in got] == [(e.label, e.onset_s, e.offset_s) for e in want]
    np.testing.assert_allclose([e.score for e in got], [e.score for e in want], rtol=1e-9, atol=1e-12)


@FAST
@given(streams())
def test_every_notice_is_followed_by_its_event_and_vice_versa(case):
    p, labels, cfg, cuts = case
    items = run_all(EventDecoder(labels, HOP, cfg), p, cuts)
    open_notices: dict[str, OnsetNotice] = {}
    for item in items:
        if isinstance(item, OnsetNotice):
            assert item.label not in open_notices  # one event at a time per class
            open_notices[item.label] = item
        else:
            notice = open_notices.pop(item.label)  # no event without a notice before it
            assert notice.onset_s == item.onset_s
            assert item.offset_s > item.onset_s
            min_event_s = cfg.per_class("min_event_s", len(labels))[labels.index(item.label)]
            assert item.offset_s - item.onset_s >= min_event_s - 1e-9 or item.onset_s == 0.0
    assert not open_notices  # flush closed everything that was announced


# ------------------------------------------------------------------------------------------
# Rules, by hand
# ------------------------------------------------------------------------------------------


def test_timing_convention_is_exact():
    p = np.zeros((40, 1))
    p[7:19] = 0.9
    (ev,) = decode_offline(p, ["dog"], HOP, DecoderConfig())
    assert ev == SoundEvent("dog", 7 * HOP, 19 * HOP, pytest.approx(0.9))
    assert (ev.onset_s, ev.offset_s) == (7 * HOP, 19 * HOP)  # a*hop, b*hop bit for bit
    assert [f.name for f in __import__("dataclasses").fields(SoundEvent)] == ["label", "onset_s", "offset_s", "score"]


def test_hysteresis_hovering_between_off_and_on_keeps_the_event():
    p, dec = one_class([0, 0.9, 0.6, 0.55, 0.7, 0.6, 0.3, 0.6, 0.75, 0], on_thresholds=(0.8,), off_thresholds=(0.5,))
    # Frames 2-5 stay in [off, on): the event lives on; frame 6 dips below off and ends it;
    # frames 7-8 never reach on again, so no new event.
    assert cells(run_all(dec, p)) == [("dog", 1, 6)]


def test_hysteresis_off_equal_to_on_is_a_plain_threshold():
    p, dec = one_class([0.1, 0.5, 0.49, 0.5, 0.5, 0.2])
    assert cells(run_all(dec, p)) == [("dog", 1, 2), ("dog", 3, 5)]  # p >= 0.5 is active


def test_score_is_the_mean_probability_over_the_event():
    p, dec = one_class([0, 0.6, 0.8, 1.0, 0])
    (ev,) = events(run_all(dec, p))
    assert ev.score == pytest.approx(0.8)


def test_min_event_drops_short_blips_and_delays_the_notice():
    # min_event 0.1 s = 5 frames: a 4-frame blip vanishes without a notice; a 6-frame event is
    # announced when its 5th frame arrives (frame 14), not before.
    values = [0] * 3 + [1] * 4 + [0] * 3 + [1] * 6 + [0] * 3
    p, dec = one_class(values, min_event_s=0.1)
    seen = {}
    for t in range(len(p)):
        for item in dec.push(p[t:t + 1]):
            seen[t] = item
    seen["flush"] = dec.flush()
    assert list(seen) == [14, 16, "flush"]
    assert seen[14] == OnsetNotice("dog", 10 * HOP, 1.0)
    assert seen[16] == SoundEvent("dog", 10 * HOP, 16 * HOP, 1.0)
    assert seen["flush"] == []


def test_min_event_exactly_long_enough_is_kept():
    p, dec = one_class([0] + [1] * 5 + [0], min_event_s=0.1)
    assert cells(run_all(dec, p)) == [("dog", 1, 6)]


def test_without_min_event_the_notice_comes_with_the_onset_frame():
    p, dec = one_class([0, 0, 0.9, 0.9, 0])
    assert dec.push(p[:2]) == []
    assert dec.push(p[2:3]) == [OnsetNotice("dog", 2 * HOP, 0.9)]
    assert dec.push(p[3:4]) == []
    assert dec.push(p[4:]) == [SoundEvent("dog", 2 * HOP, 4 * HOP, pytest.approx(0.9))]


def test_min_gap_merges_close_events_and_holds_the_end_back():
    # min_gap 0.1 s = 5 frames: a 3-frame gap merges, a 5-frame gap does not.
    values = [1] * 4 + [0] * 3 + [1] * 4 + [0] * 5 + [1] * 4 + [0] * 6
    p, dec = one_class(values, min_gap_s=0.1)
    got = {}
    for t in range(len(p)):
        for item in dec.push(p[t:t + 1]):
            got.setdefault(t, []).append(item)
    assert cells(got[15]) == [("dog", 0, 11)]  # ended at 11, emitted once 5 quiet frames passed
    assert isinstance(got[0][0], OnsetNotice) and isinstance(got[16][0], OnsetNotice)
    assert cells(got[24]) == [("dog", 16, 20)]
    merged = got[15][0]
    assert merged.score == pytest.approx(8 / 11)  # gap frames count in the mean
    assert dec.flush() == []


def test_flush_emits_a_held_back_event_at_once():
    p, dec = one_class([1, 1, 0, 0], min_gap_s=1.0)
    assert events(dec.push(p)) == []  # the gap could still be bridged
    assert cells(dec.flush()) == [("dog", 0, 2)]


def test_flush_closes_open_events_at_the_end_of_the_last_frame():
    p = np.zeros((10, 3))
    p[4:, 0] = 0.9
    p[8:, 2] = 0.7
    dec = EventDecoder(LABELS, HOP, DecoderConfig())
    pushed = dec.push(p)
    assert all(isinstance(x, OnsetNotice) for x in pushed) and len(pushed) == 2
    assert dec.flush() == [SoundEvent("dog", 4 * HOP, 10 * HOP, pytest.approx(0.9)),
                           SoundEvent("rain", 8 * HOP, 10 * HOP, pytest.approx(0.7))]
    assert dec.flush() == []  # flush ends the stream; the decoder starts afresh
    assert dec.frames_seen == 0


def test_flush_drops_an_open_event_that_is_still_too_short():
    p, dec = one_class([0, 0, 1, 1], min_event_s=0.1)
    assert run_all(dec, p) == []


def test_outputs_come_in_decision_order_across_classes():
    p = np.zeros((6, 3))
    p[1:3, 2] = 0.9  # rain: on at 1, ends at 3
    p[2:5, 0] = 0.9  # dog: on at 2, ends at 5
    dec = EventDecoder(LABELS, HOP, DecoderConfig())
    kinds = [(type(x).__name__, x.label) for x in dec.push(p)]
    assert kinds == [("OnsetNotice", "rain"), ("OnsetNotice", "dog"), ("SoundEvent", "rain"), ("SoundEvent", "dog")]


def test_reset_forgets_the_stream():
    p, dec = one_class([1, 1, 1])
    dec.push(p)
    dec.reset()
    assert dec.flush() == []
    assert cells(run_all(dec, p)) == [("dog", 0, 3)]


def test_first_frame_sets_the_origin_and_must_stay_contiguous():
    p, dec = one_class([0, 1, 1, 0])
    items = dec.push(p[:2], first_frame=100)
    assert items == [OnsetNotice("dog", 101 * HOP, 1.0)]
    dec.push(p[2:3], first_frame=102)
    with pytest.raises(ValueError, match="contiguous.*expected first_frame=103"):
        dec.push(p[3:], first_frame=104)
    assert cells(dec.push(p[3:], first_frame=103)) == [("dog", 101, 103)]


# ------------------------------------------------------------------------------------------
# Smoothing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 5, 7])
def test_median_delay_is_compensated_for_clean_pulses(k):
    p = np.zeros((40, 1))
    p[10:25] = 1.0
    (ev,) = decode_offline(p, ["dog"], HOP, DecoderConfig(smoothing_frames=k))
    assert (ev.onset_s, ev.offset_s) == (10 * HOP, 25 * HOP)
    dec = EventDecoder(["dog"], HOP, DecoderConfig(smoothing_frames=k), compensate_delay=False)
    d = (k - 1) // 2
    assert cells(run_all(dec, p)) == [("dog", 10 + d, 25 + d)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smoothed_scores_are_what_the_decoder_thresholds(seed):
    """Runs of smoothed_scores >= on give the decoder's events (plain threshold, no durations):
    the scores are the decoder's median per class, moved back by each class's delay. The signal
    ends in 12 quiet frames so that no event reaches into the tail the decoder has not decided."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 1.0, (300, 3))
    p[-12:] = 0.0
    config = DecoderConfig(smoothing_frames=(1, 5, 9))
    s = smoothed_scores(p, LABELS, config)
    assert s.shape == p.shape
    np.testing.assert_array_equal(s[:, 0], p[:, 0])  # a window of 1 leaves the class as it is
    expected = []
    for c, label in enumerate(LABELS):
        active = np.concatenate([[False], s[:, c] >= 0.5, [False]])
        edges = np.flatnonzero(np.diff(active.astype(int)))
        expected += [(label, int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]
    got = cells(decode_offline(p, LABELS, HOP, config))
    assert sorted(got) == sorted(expected) and len(got) > 20


def test_smoothed_scores_reject_a_wrong_shape():
    with pytest.raises(ValueError, match=r"must be \(n_frames, 3\)"):
        smoothed_scores(np.zeros((10, 2)), LABELS, DecoderConfig(smoothing_frames=3))


def test_median_removes_short_blips_and_fills_short_holes():
    p = np.zeros((30, 1))
    p[3:5] = 1.0  # 2-frame blip: gone with k = 5
    p[10:20] = 1.0
    p[14:16] = 0.0  # 2-frame hole: filled
    assert cells(decode_offline(p, ["dog"], HOP, DecoderConfig(smoothing_frames=5))) == [("dog", 10, 20)]


def test_smoothing_edge_padding_starts_without_warm_up():
    p = np.ones((12, 1))
    p[6:] = 0.0
    assert cells(decode_offline(p, ["dog"], HOP, DecoderConfig(smoothing_frames=5))) == [("dog", 0, 6)]
    # Edge padding reads a value at frame 0 as one that held before the stream: a lone frame-0
    # blip survives the median, and the compensated times put it back at its own cell.
    q = np.zeros((12, 1))
    q[0] = 1.0
    assert cells(decode_offline(q, ["dog"], HOP, DecoderConfig(smoothing_frames=5))) == [("dog", 0, 1)]


# ------------------------------------------------------------------------------------------
# Thresholds and overrides
# ------------------------------------------------------------------------------------------


def test_config_thresholds_are_per_class():
    p = np.full((5, 3), 0.65)
    cfg = DecoderConfig(on_thresholds=(0.6, 0.7, 0.5), off_thresholds=(0.5, 0.5, 0.5))
    assert [e.label for e in decode_offline(p, LABELS, HOP, cfg)] == ["dog", "rain"]


def test_overrides_by_label():
    cfg = DecoderConfig(on_thresholds=(0.6, 0.6, 0.6), off_thresholds=(0.4, 0.4, 0.4))
    dec = EventDecoder(LABELS, HOP, cfg, overrides={"bird": 0.3, "rain": (0.9, 0.8)})
    assert dec.on.tolist() == [0.6, 0.3, 0.9]
    assert dec.off.tolist() == [0.4, 0.3, 0.8]  # a float override lowers off to at most on
    p = np.full((4, 3), 0.5)
    assert [e.label for e in run_all(dec, p)] == ["bird", "bird"]  # notice then event
    dec = EventDecoder(LABELS, HOP, cfg, overrides={"dog": 0.9})
    assert dec.off.tolist() == [0.4, 0.4, 0.4]


def test_unknown_override_label_names_it_and_lists_labels():
    with pytest.raises(ValueError, match=r"'cat'.*\['dog', 'bird', 'rain'\]"):
        EventDecoder(LABELS, HOP, DecoderConfig(), overrides={"cat": 0.5})


@pytest.mark.parametrize("value", [1.5, 0.0, (0.5, 0.7), (0.5,), float("nan")])
def test_bad_override_values(value):
    with pytest.raises(ValueError, match="dog"):
        EventDecoder(LABELS, HOP, DecoderConfig(), overrides={"dog": value})


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_nan_probabilities_are_a_clear_error():
    dec = EventDecoder(LABELS, HOP, DecoderConfig())
    p = np.zeros((4, 3))
    p[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*frame 2.*'bird'"):
        dec.push(p)


@pytest.mark.parametrize("shape", [(4, 2), (4,), (2, 3, 1)])
def test_wrong_shape_is_an_error(shape):
    with pytest.raises(ValueError, match=r"\(n_frames, 3\)"):
        EventDecoder(LABELS, HOP, DecoderConfig()).push(np.zeros(shape))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="hop_s"):
        EventDecoder(LABELS, 0.0, DecoderConfig())
    with pytest.raises(ValueError, match="duplicate"):
        EventDecoder(["a", "a"], HOP, DecoderConfig())
    with pytest.raises(ValueError, match="3 classes"):
        EventDecoder(LABELS, HOP, DecoderConfig(on_thresholds=(0.5, 0.5)))


def test_empty_push_is_a_no_op():
    dec = EventDecoder(LABELS, HOP, DecoderConfig())
    assert dec.push(np.zeros((0, 3))) == []
    assert dec.flush() == []


# ------------------------------------------------------------------------------------------
# Writers and JSON
# ------------------------------------------------------------------------------------------

EVS = [SoundEvent("dog", 0.14, 0.38, 0.91234), SoundEvent("rain", 1.0, 2.5, 0.5)]


def test_dcase_tsv_text(tmp_path):
    buf = io.StringIO()
    write_dcase_tsv(buf, [("a.wav", EVS[0]), ("dir/b.wav", EVS[1])])
    assert buf.getvalue() == (
        "filename\tonset\toffset\tevent_label\tscore\n"
        "a.wav\t0.140\t0.380\tdog\t0.9123\n"
        "dir/b.wav\t1.000\t2.500\train\t0.5000\n"
    )
    path = tmp_path / "out.tsv"
    write_dcase_tsv(path, [("a.wav", EVS[0])])
    assert path.read_bytes() == b"filename\tonset\toffset\tevent_label\tscore\na.wav\t0.140\t0.380\tdog\t0.9123\n"


def test_dcase_tsv_with_no_events_is_just_the_header():
    buf = io.StringIO()
    write_dcase_tsv(buf, [])
    assert buf.getvalue() == "filename\tonset\toffset\tevent_label\tscore\n"


def test_audacity_labels_text(tmp_path):
    buf = io.StringIO()
    write_audacity_labels(buf, EVS)
    assert buf.getvalue() == "0.140000\t0.380000\tdog\n1.000000\t2.500000\train\n"
    path = tmp_path / "labels.txt"
    write_audacity_labels(str(path), EVS[:1])
    assert path.read_text() == "0.140000\t0.380000\tdog\n"


def test_json_forms():
    assert event_to_json(SoundEvent("dog", 3 * 0.02, 0.38, 0.9123456789)) == {
        "type": "event", "label": "dog", "onset_s": 0.06, "offset_s": 0.38, "score": 0.912346}
    assert event_to_json(OnsetNotice("dog", 0.06, 0.9)) == {"type": "onset", "label": "dog", "onset_s": 0.06}
    assert json.loads(json.dumps(event_to_json(EVS[0])))["type"] == "event"
    assert EVS[0].to_dict() == {"label": "dog", "onset_s": 0.14, "offset_s": 0.38, "score": 0.91234}
    with pytest.raises(TypeError):
        event_to_json(("dog", 0.1, 0.2, 0.3))


# ------------------------------------------------------------------------------------------
# Per-class decoder settings
# ------------------------------------------------------------------------------------------


def test_per_class_settings_act_on_their_own_class_only():
    # Two classes with the same probabilities: a 3-frame blip and a 12-frame event. Class 0 drops
    # anything under 0.1 s and smooths over 5 frames; class 1 keeps everything, unsmoothed.
    x = np.zeros(40)
    x[5:8] = 0.9
    x[20:32] = 0.9
    p = np.stack([x, x], axis=1)
    cfg = DecoderConfig(min_event_s=(0.1, 0.0), smoothing_frames=(5, 1))
    got = cells(decode_offline(p, ["a", "b"], HOP, cfg))
    assert ("a", 5, 8) not in got and ("a", 20, 32) in got
    assert ("b", 5, 8) in got and ("b", 20, 32) in got


def test_per_class_lengths_must_match_the_labels():
    with pytest.raises(ValueError, match="smoothing_frames has 2 values for 3 classes"):
        EventDecoder(["a", "b", "c"], HOP, DecoderConfig(smoothing_frames=(3, 5)))
    with pytest.raises(ConfigError, match="min_event_s and min_gap_s must be >= 0"):
        DecoderConfig(min_gap_s=(0.1, -0.2))


def test_per_class_config_round_trips_through_a_dict():
    cfg = DecoderConfig(on_thresholds=(0.6, 0.4), off_thresholds=(0.3, 0.2), min_event_s=(0.1, 0.3),
                        min_gap_s=0.2, smoothing_frames=(7, 1))
    again = DecoderConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.smoothing_delay_frames(2) == 3


def test_smoother_delay_counts_in_the_engine_latency():
    from rtsed.config import DetectorConfig, ModelConfig
    from rtsed.serve.engine import DetectionEngine

    class Stepper:  # the engine only asks a stepper for its lookahead before the first push
        lookahead_frames = 0

    model = ModelConfig.from_name("dnd_7_10_causal", n_classes=2)
    plain = DetectorConfig(model=model, labels=("a", "b"))
    smooth = plain.replace(decoder=DecoderConfig(smoothing_frames=(1, 9)))
    a = DetectionEngine(Stepper(), plain, frames_per_step=1)
    b = DetectionEngine(Stepper(), smooth, frames_per_step=1)
    assert b.algorithmic_latency_s - a.algorithmic_latency_s == pytest.approx(4 * plain.frontend.hop_s)
