"""Decoders whose events hold wherever the frames fall (``train.tune``): floors under the median
window and the hysteresis width, and the stability weight chosen on validation files the decoder
was not tuned on (``choose_stability_weight``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from train.annotations import Event
from train.tune import ShiftPair, choose_stability_weight, held_out_figures, main, split_halves, tune_decoder

HOP = 0.02


def _clean_events():
    """A file whose events sit at 0.9 over a floor of 0.0-0.1: the search without floors keeps the
    raw frames and a single threshold (its first candidates already score F1 = 1)."""
    rng = np.random.default_rng(0)
    t = 3000
    targets = np.zeros((t, 1), np.float32)
    events = []
    for start in range(100, t - 200, 400):
        targets[start:start + 150] = 1
        events.append(Event("v", start * HOP, (start + 150) * HOP, "a"))
    probs = np.where(targets > 0, 0.9, rng.uniform(0.0, 0.1, (t, 1)))
    return [SimpleNamespace(probs=probs, targets=targets, events=tuple(events))]


def test_floors_bound_every_choice_from_below():
    free, table = tune_decoder(_clean_events(), HOP, ["a"], "event_f1", rounds=1)
    assert table[0]["event_f1_tuned"] == 1.0
    assert free.smoothing_frames == (1,) and free.on_thresholds == free.off_thresholds  # what the floors forbid
    floored, table = tune_decoder(_clean_events(), HOP, ["a"], "event_f1", rounds=1, min_smoothing_frames=5,
                                  min_hysteresis=0.1)
    assert table[0]["event_f1_tuned"] == 1.0
    assert floored.smoothing_frames[0] >= 5
    assert floored.on_thresholds[0] - floored.off_thresholds[0] >= 0.1 - 1e-9


def test_a_floor_beyond_the_latency_budget_is_refused():
    with pytest.raises(ValueError, match="lower the floor or raise the bound"):
        tune_decoder(_clean_events(), HOP, ["a"], max_smoothing_s=0.04, min_smoothing_frames=7)
    with pytest.raises(ValueError, match="hysteresis"):
        tune_decoder(_clean_events(), HOP, ["a"], min_hysteresis=0.5)


def _flickering_files(n_files: int = 4):
    """n_files files with a shifted copy each (outputs: the files, then the copies). Each file
    holds 10 events of 2 s at 0.9; in its copy every other event sits at 0.4 (what a sub-hop shift
    can do to a hovering probability). 5 non-events at 0.4 lie in both."""
    rng = np.random.default_rng(6)
    t = 6000
    wholes, cuts = [], []
    for _ in range(n_files):
        targets = np.zeros((t, 1), np.float32)
        events, whole = [], rng.uniform(0.0, 0.1, (t, 1))
        cut = whole.copy()
        for i, start in enumerate(range(200, t - 400, 550)):
            targets[start:start + 100] = 1
            events.append(Event("v", start * HOP, (start + 100) * HOP, "a"))
            whole[start:start + 100] = 0.9
            cut[start:start + 100] = 0.4 if i % 2 else 0.9
            if i % 2 == 0:
                whole[start + 275:start + 375] = cut[start + 275:start + 375] = 0.4
        wholes.append(SimpleNamespace(probs=whole, targets=targets, events=tuple(events)))
        cuts.append(SimpleNamespace(probs=cut, targets=targets, events=tuple(events)))
    pairs = tuple(ShiftPair(i, n_files + i, 0.0) for i in range(n_files))
    return wholes + cuts, pairs


def test_halves_alternate_the_files_and_keep_each_file_with_its_copy():
    outputs, pairs = _flickering_files(4)
    (a, a_pairs), (b, b_pairs) = split_halves(outputs, pairs)
    assert [id(o) for o in a] == [id(outputs[i]) for i in (0, 2, 4, 6)]
    assert [id(o) for o in b] == [id(outputs[i]) for i in (1, 3, 5, 7)]
    assert a_pairs == b_pairs == (ShiftPair(0, 2, 0.0), ShiftPair(1, 3, 0.0))


def test_the_weight_is_chosen_for_events_that_hold_on_the_held_out_half():
    outputs, pairs = _flickering_files(4)
    weight, rows = choose_stability_weight(outputs, pairs, HOP, ["a"], [0.0, 1.0], target_unchanged=0.9,
                                           max_frame_f1_drop=1.0, rounds=1)
    free, steady = rows
    # F1 alone keeps to the strong events; half of them vanish in the held-out copies: 10 of the
    # 15 events of a file and its copy have a partner.
    assert free.stability_weight == 0.0 and free.unchanged == pytest.approx(2 * 10 / (20 + 10))
    assert free.event_f1 == 1.0
    # The weight buys a threshold at 0.4: every event holds, at the price of the non-events.
    assert steady.unchanged == 1.0 and steady.event_f1 == pytest.approx(2 * 20 / (20 + 30))
    assert weight == 1.0
    # Nothing meets the target when the steady decoder may not lose frame F1: the steadiest is taken.
    assert choose_stability_weight(outputs, pairs, HOP, ["a"], [0.0, 1.0], target_unchanged=0.9,
                                   max_frame_f1_drop=0.0, rounds=1)[0] == 1.0
    # A target the free decoder meets keeps the better event F1.
    assert choose_stability_weight(outputs, pairs, HOP, ["a"], [0.0, 1.0], target_unchanged=0.6,
                                   max_frame_f1_drop=1.0, rounds=1)[0] == 0.0


def test_held_out_figures_count_what_the_decoder_reports():
    from rtsed.config import DecoderConfig

    outputs, pairs = _flickering_files(2)
    strict = DecoderConfig(on_thresholds=(0.6,), off_thresholds=(0.5,))
    event_f1, frame_f1, unchanged = held_out_figures(outputs, pairs, HOP, ["a"], strict)
    assert event_f1 == 1.0 and frame_f1 == 1.0 and unchanged == pytest.approx(2 * 10 / 30)


@pytest.mark.parametrize("extra, message", [
    (["--stability-weight", "0", "0.5"], "--shifts-ms 0"),
    (["--shifts-ms", "0", "10", "--stability-weight", "-1"], ">= 0"),
    (["--min-smoothing-frames", "0"], "--min-smoothing-frames"),
    (["--min-hysteresis", "0.5"], "--min-hysteresis"),
])
def test_cli_refuses_what_cannot_mean_what_it_says(capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(["--model", "m.pt", "--data", "d", "--out", "o.pt", *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
