"""Event stability (benchmarks/event_stability.py): the one-to-one event matching it counts with,
and the bundled detector's events under sub-hop shifts of a procedural scene.

A recording does not know where the detector's 20 ms frames fall; cutting its first 10 ms moves
every frame boundary by half a hop. The figures on real scenes are the benchmark's (README,
"Limits"); here a procedural scene that the bundled dnd_7_10 answers with several events of
several classes must keep them.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.event_stability import Stability, match_events, shift_stability
from rtsed.serve.decode import SoundEvent
from serve_helpers import make_scene  # tests/ is on sys.path (not a package)


def ev(label: str, onset_s: float) -> SoundEvent:
    return SoundEvent(label, onset_s, onset_s + 1.0, 0.5)


def test_matching_is_one_to_one_per_label_within_the_tolerance():
    a = [ev("dog", 1.0), ev("dog", 1.05), ev("rain", 3.0), ev("rain", 7.0)]
    b = [ev("dog", 1.08), ev("rain", 3.1), ev("dog", 7.0), ev("rain", 7.11)]
    got = match_events(a, b, tolerance_s=0.1)
    # dog 1.0 or 1.05 pairs with 1.08 (one of them only), rain 3.0-3.1 at exactly the tolerance;
    # dog 7.0 has no dog partner (rain 7.0 is another label), rain 7.0-7.11 is too far apart.
    assert got == Stability(4, 4, 2) and got.unchanged == pytest.approx(0.5)
    assert match_events(b, a, tolerance_s=0.1) == Stability(4, 4, 2)  # symmetric
    assert match_events([], []).unchanged == 1.0 and match_events(a, []).unchanged == 0.0
    # A maximum matching: pairing 1.0 with its nearest partner (0.97) would leave 1.08 unmatched.
    assert match_events([ev("dog", 0.9), ev("dog", 1.0)], [ev("dog", 0.97), ev("dog", 1.08)]).matched == 2


@pytest.fixture(scope="module")
def bundled():
    from rtsed.models.bundled import resolve_model
    from rtsed.serve.engine import make_stepper

    stepper, config, _ = make_stepper(resolve_model("dnd_7_10"), "torch", "cpu")
    return stepper, config


@pytest.fixture(scope="module")
def scene(bundled) -> tuple[np.ndarray, list[SoundEvent]]:
    """Three procedural scenes end to end (24 s), and the bundled detector's events on them."""
    from benchmarks.event_stability import detect_signal

    stepper, config = bundled
    x = np.concatenate([make_scene(seed=seed) for seed in range(3)])
    events = detect_signal(x, stepper, config)
    assert len(events) >= 6 and len({e.label for e in events}) >= 2, events  # the scene drives the detector
    return x, events


def test_a_whole_hop_shift_keeps_every_event(bundled, scene):
    """The control: cutting exactly one hop moves every frame boundary onto another, so every
    event must come back (to the frame) on the uncut timeline."""
    stepper, config = bundled
    x, events = scene
    got = shift_stability(x, stepper, config, config.frontend.hop_s, events)
    assert got == Stability(len(events), len(events), len(events))


@pytest.mark.parametrize("shift_ms", [5.0, 10.0])
def test_sub_hop_shifts_keep_the_events(bundled, scene, shift_ms):
    """Half a hop (and a quarter) moves every frame boundary: the decoder must still report the
    same events (label, onset within 0.1 s, one to one)."""
    stepper, config = bundled
    x, events = scene
    got = shift_stability(x, stepper, config, shift_ms / 1000, events)
    assert got.unchanged >= 0.9, (got, events)
