"""False-alarm-aware decoder tuning (``train.tune --false-alarms``): the fast event count on
joined false-alarm audio equals the decoder's, the rate it tunes on is the one train.evaluate
--false-alarms reports for the chosen decoder, and a cost or a bound moves each class's choice."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtsed.config import DecoderConfig, DetectorConfig, FrontendConfig, ModelConfig
from rtsed.models.checkpoint import load_checkpoint, save_checkpoint
from rtsed.models.model import SEDModel
from train import false_alarms as fa
from train.annotations import Event
from train.tune import (
    FalseAlarmAudio,
    FalseAlarmCost,
    count_events,
    decode_joined,
    join,
    main,
    tune_decoder,
)

from decode_reference import decode_smoothed, median_smooth  # tests/ is on sys.path

HOP = 0.02
RATE = 16000
LABELS = ("speech", "tone")


@st.composite
def _files(draw):
    levels = st.sampled_from([0.0, 0.2, 0.45, 0.5, 0.55, 0.8, 1.0])
    files = draw(st.lists(st.lists(levels, min_size=1, max_size=40), min_size=1, max_size=5))
    counted = draw(st.lists(st.booleans(), min_size=len(files), max_size=len(files)))
    on = draw(st.sampled_from([0.3, 0.5, 0.7]))
    off = min(on, draw(st.sampled_from([0.2, 0.4, 0.5])))
    return [np.asarray(f, float) for f in files], counted, draw(st.sampled_from([1, 3, 5])), on, off, \
        draw(st.integers(1, 6)), draw(st.integers(0, 6))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_files())
def test_joined_count_equals_decoding_each_file(case):
    files, counted, k, on, off, min_event, gap = case
    audio = FalseAlarmAudio([f[:, None] for f in files], ["x" if c else "a" for c in counted], minutes=1.0)
    want = sum(len(decode_smoothed(median_smooth(f, k), 0, on, off, min_event, gap))
               for f, c in zip(files, counted) if c)
    # Events labelled "a" are right on files of category "a": only the others count.
    assert audio.per_minute(0, "a", k, on, off, min_event, gap) == want
    joined, file_id = audio.joined(0, k)
    assert count_events(joined, file_id, np.ones(len(files), bool), on, off, min_event, gap) == \
        sum(len(decode_smoothed(median_smooth(f, k), 0, on, off, min_event, gap)) for f in files)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_files(), st.integers(0, 4))
def test_joined_decoding_equals_decoding_each_file(case, delay):
    files, _, k, on, off, min_event, gap = case
    smoothed = [median_smooth(f, k) for f in files]
    joined, file_id, first = join(smoothed)
    lengths = np.array([f.size for f in files])
    got = decode_joined(joined, file_id, first, lengths, delay, on, off, min_event, gap)
    assert [[tuple(map(int, c)) for c in cells] for cells in got] == \
        [decode_smoothed(s, delay, on, off, min_event, gap) for s in smoothed]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.floats(0, 1), max_size=30), min_size=1, max_size=5), st.sampled_from([1, 2, 3, 5, 31]))
def test_smoothing_every_file_at_once_equals_smoothing_each(files, k):
    from train.tune import smooth_and_join

    signals = [np.asarray(f, float) for f in files]
    want = join([median_smooth(x, k) if x.size else x for x in signals])
    got = smooth_and_join(signals, k)
    for w, g in zip(want, got):
        assert np.array_equal(w, g)


# ------------------------------------------------------------- the rate is train.evaluate's rate


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for name, seconds in {"speech/a.wav": 6.0, "music/b.wav": 9.0, "ambience/c.wav": 4.0}.items():
        path = tmp_path / "fa" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, (0.01 * rng.standard_normal(int(seconds * RATE))).astype(np.float32), RATE)
    return tmp_path / "fa"


@pytest.fixture
def checkpoint(tmp_path):
    frontend = FrontendConfig.for_rate(RATE)
    model_cfg = ModelConfig.from_name("dnd_3_1_causal", n_classes=2, channels=8)
    config = DetectorConfig(frontend=frontend, model=model_cfg, labels=LABELS)
    save_checkpoint(tmp_path / "m.pt", SEDModel(model_cfg).eval(), config)
    return load_checkpoint(tmp_path / "m.pt")


@pytest.fixture
def wavy(monkeypatch):
    """Logits that cross every threshold many times, different per file length and class."""
    def logits(detector, features):
        t = np.arange(features.shape[0])
        rng = np.random.default_rng(features.shape[0])
        out = np.stack([3 * np.sin(t / 9.0) + rng.normal(0, 1.5, t.size),
                        3 * np.sin(t / 23.0 + 1) + rng.normal(0, 1.0, t.size)], axis=1)
        return torch.from_numpy(out.astype(np.float32))

    monkeypatch.setattr(fa, "file_logits", logits)


@pytest.mark.parametrize("decoder", [
    DecoderConfig(),
    DecoderConfig(on_thresholds=(0.7, 0.4), off_thresholds=(0.4, 0.3), min_event_s=(0.1, 0.0),
                  min_gap_s=(0.2, 0.06), smoothing_frames=(5, 3)),
    DecoderConfig(on_thresholds=(0.3, 0.9), off_thresholds=(0.3, 0.6), min_event_s=0.5, min_gap_s=1.0,
                  smoothing_frames=(9, 1)),
])
def test_tuned_rate_is_the_rate_evaluate_reports(folder, checkpoint, wavy, decoder):
    probs, categories, minutes = fa.false_alarm_probabilities(checkpoint, folder)
    assert sorted(categories) == ["ambience", "music", "speech"]
    audio = FalseAlarmAudio(probs, categories, minutes)
    checkpoint.config = checkpoint.config.replace(decoder=decoder)
    reported = fa.false_alarms(checkpoint, folder)
    assert reported["minutes"] == pytest.approx(minutes)
    for c, label in enumerate(LABELS):
        frames = lambda s: int(np.ceil(s / HOP - 1e-6))  # noqa: E731
        rate = audio.per_minute(c, label, decoder.per_class("smoothing_frames", 2)[c],
                                decoder.thresholds(2)[0][c], decoder.thresholds(2)[1][c],
                                max(1, frames(decoder.per_class("min_event_s", 2)[c])),
                                frames(decoder.per_class("min_gap_s", 2)[c]))
        assert rate * minutes == reported["per_label"][label]["false_alarms"]
    assert reported["false_alarms"] > 0


# ------------------------------------------------------------------- the cost moves the choice


def _validation(labels=("a",)):
    """One validation file with 10 events of 2 s: 5 strong ones (probabilities 0.7-0.9) and 5 weak
    ones (0.35-0.45, found only by thresholds <= 0.35), alternating, above a floor of 0-0.1."""
    t = 6000
    rng = np.random.default_rng(4)
    targets = np.zeros((t, 1), np.float32)
    probs = rng.uniform(0.0, 0.1, (t, 1))
    events = []
    for i, start in enumerate(range(200, t - 300, 550)):
        targets[start:start + 100] = 1
        probs[start:start + 100] = rng.uniform(0.7, 0.9, (100, 1)) if i % 2 else rng.uniform(0.35, 0.45, (100, 1))
        events.append(Event("v", start * HOP, (start + 100) * HOP, labels[0]))
    return [SimpleNamespace(probs=probs, targets=targets, events=tuple(events))]


def _lure(category="music"):
    """False-alarm audio: 2 minutes holding 20 bursts just like the weak events (2 s at 0.35-0.45),
    4 s apart (more than the longest gap the search may merge)."""
    p = np.random.default_rng(5).uniform(0.0, 0.1, (6000, 1))
    for start in range(50, 6000, 300):
        p[start:start + 100] = np.random.default_rng(start).uniform(0.35, 0.45, (100, 1))
    return FalseAlarmAudio([p], [category], minutes=2.0)


def test_a_bound_on_false_alarms_gives_up_f1_for_them():
    free, table = tune_decoder(_validation(), HOP, ["a"], "event_f1", rounds=1)
    assert table[0]["event_f1_tuned"] == 1.0 and free.on_thresholds[0] <= 0.35
    bounded, table = tune_decoder(_validation(), HOP, ["a"], "event_f1", rounds=1,
                                  false_alarms=FalseAlarmCost(_lure(), max_per_min=0.0))
    # Whatever finds the weak events finds the bursts: within the bound only the strong ones remain.
    assert table[0]["fa_per_min_tuned"] == 0.0
    assert table[0]["event_f1_tuned"] == pytest.approx(2 * 5 / (5 + 10))
    assert bounded.on_thresholds[0] >= 0.45


def test_a_weight_trades_f1_for_false_alarms():
    _, light = tune_decoder(_validation(), HOP, ["a"], "event_f1", rounds=1,
                            false_alarms=FalseAlarmCost(_lure(), weight=0.001))
    _, heavy = tune_decoder(_validation(), HOP, ["a"], "event_f1", rounds=1,
                            false_alarms=FalseAlarmCost(_lure(), weight=1.0))
    assert light[0]["event_f1_tuned"] == 1.0 and light[0]["fa_per_min_tuned"] == 10.0
    assert heavy[0]["fa_per_min_tuned"] == 0.0
    assert heavy[0]["event_f1_tuned"] == pytest.approx(2 * 5 / (5 + 10))


def test_events_of_the_file_category_are_not_false_alarms():
    # The same bursts on a file of the class's own category (speech events on speech) cost nothing.
    _, table = tune_decoder(_validation(("speech",)), HOP, ["speech"], "event_f1", rounds=1,
                            false_alarms=FalseAlarmCost(_lure("speech"), max_per_min=0.0))
    assert table[0]["event_f1_tuned"] == 1.0 and table[0]["fa_per_min_tuned"] == 0.0


def test_cli_refuses_a_cost_without_audio(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", "m.pt", "--data", "d", "--out", "o.pt", "--fa-weight", "0.1"])
    assert exc.value.code == 2
    assert "--false-alarms DIR" in capsys.readouterr().err


# --------------------------------------------------------------------- events that hold under shifts


def test_flicker_counts_events_without_a_partner_in_the_shifted_copy():
    from train.tune import ClassTarget, ShiftPair, StabilityCost

    whole = np.array([[100, 150], [300, 320], [500, 600]])  # onsets 2.0, 6.0, 10.0 s
    cut = np.array([[99, 150], [296, 320], [700, 720]])  # + 0.01 s: 1.99 (kept), 5.93 (kept), 14.0 (new)
    target = ClassTarget([np.zeros((4, 2)), np.zeros((4, 2))], [np.zeros(1, bool)] * 2)
    cost = StabilityCost((ShiftPair(0, 1, 0.01),), weight=1.0)
    # 10.0 s and 14.0 s have no partner: 2 events per 4 reference events.
    assert cost.flicker([whole, cut], target, HOP) == pytest.approx(2 / 4)
    assert cost.flicker([whole, whole[:0]], target, HOP) == pytest.approx(3 / 4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.lists(st.integers(0, 300), max_size=10), st.lists(st.integers(0, 300), max_size=10),
                          st.sampled_from([0.005, 0.01, 0.015])), min_size=1, max_size=3))
def test_flicker_counts_what_the_stability_benchmark_counts(files):
    """Per pair (a file, its copy cut by a shift), the events without a partner are those
    benchmarks.event_stability leaves unmatched (same label, onsets within 0.1 s, one to one)."""
    from benchmarks.event_stability import match_events, shifted_events
    from rtsed.serve.decode import SoundEvent
    from train.tune import ClassTarget, ShiftPair, StabilityCost

    cells, pairs, unmatched = [], [], 0
    for whole, cut, shift_s in files:
        a = np.array([(x, x + 5) for x in sorted(whole)], float).reshape(-1, 2)
        b = np.array([(x, x + 5) for x in sorted(cut)], float).reshape(-1, 2)
        pairs.append(ShiftPair(len(cells), len(cells) + 1, shift_s))
        cells += [a, b]
        as_events = lambda c: [SoundEvent("a", x * HOP, y * HOP, 1.0) for x, y in c]  # noqa: E731
        got = match_events(as_events(a), shifted_events(as_events(b), shift_s))
        unmatched += got.n_a + got.n_b - 2 * got.matched
    target = ClassTarget([np.zeros((2, 2))] * len(cells), [np.zeros(1, bool)] * len(cells))
    assert StabilityCost(tuple(pairs), 1.0).flicker(cells, target, HOP) == pytest.approx(unmatched / (2 * len(files)))


def _aligned_pair():
    """A file and its 10 ms shifted copy: 10 events at 0.9 in the file; in the copy 5 of them sit at
    0.4 (found only at thresholds <= 0.4). Both hold 5 non-events at 0.4 of the same length."""
    rng = np.random.default_rng(6)
    t = 6000
    targets = np.zeros((t, 1), np.float32)
    events, whole = [], rng.uniform(0.0, 0.1, (t, 1))
    for start in range(200, t - 400, 550):
        targets[start:start + 100] = 1
        events.append(Event("v", start * HOP, (start + 100) * HOP, "a"))
    cut = whole.copy()
    for i, start in enumerate(range(200, t - 400, 550)):
        whole[start:start + 100] = 0.9
        cut[start:start + 100] = 0.4 if i % 2 else 0.9
        if i % 2 == 0:
            whole[start + 275:start + 375] = cut[start + 275:start + 375] = 0.4
    same = SimpleNamespace(targets=targets, events=tuple(events))
    return [SimpleNamespace(probs=whole, **vars(same)), SimpleNamespace(probs=cut, **vars(same))]


def test_a_stability_cost_prefers_events_that_hold_across_alignments():
    from train.tune import ShiftPair, StabilityCost

    outputs = _aligned_pair()
    # Pooled F1 alone keeps to the strong events (15 of 20 found, no false ones: 0.857) although
    # 5 of them vanish in the shifted copy; a threshold at 0.4 finds all 20, and 10 non-events.
    _, free = tune_decoder(outputs, HOP, ["a"], "event_f1", rounds=1,
                           stability=StabilityCost((ShiftPair(0, 1, 0.0),), weight=0.0))
    assert free[0]["event_f1_tuned"] == pytest.approx(2 * 15 / 35)
    assert free[0]["flicker_tuned"] == pytest.approx(5 / 10)
    steady, table = tune_decoder(outputs, HOP, ["a"], "event_f1", rounds=1,
                                 stability=StabilityCost((ShiftPair(0, 1, 0.0),), weight=1.0))
    assert table[0]["flicker_tuned"] == 0.0
    assert table[0]["event_f1_tuned"] == pytest.approx(2 * 20 / 50)
    assert steady.on_thresholds[0] <= 0.4


def test_cli_refuses_a_stability_cost_without_shifts(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", "m.pt", "--data", "d", "--out", "o.pt", "--stability-weight", "0.5"])
    assert exc.value.code == 2
    assert "--shifts-ms 0" in capsys.readouterr().err
