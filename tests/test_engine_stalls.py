"""MultiStreamEngine with streams that stall, join late and end: a stream without audio sits
steps out (its state held) instead of holding the others back, and every stream's events equal
single-stream detection of its own signal, to the last event (``end`` completes a stream as
``DetectionEngine.flush`` does)."""

import numpy as np
import pytest

from rtsed.serve.decode import SoundEvent
from rtsed.serve.engine import DetectionEngine, MultiStreamEngine, make_stepper

from engine_helpers import lively_checkpoint

RATE = 16000


@pytest.fixture(scope="module", params=["dnd_3_10", "dws"])
def checkpoint(request, tmp_path_factory):
    """A dilated model (f_dil's ring, whose shared write position moves while a stream is held)
    and a GRU model (its hidden state)."""
    return lively_checkpoint(tmp_path_factory.mktemp("ckpt") / f"{request.param}.pt", request.param, ("a", "b", "c"),
                             seed=1)


def signal(seed, seconds=5.0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    x = 0.01 * rng.standard_normal(t.shape)
    x += 0.3 * np.sin(2 * np.pi * (500 + 200 * seed) * t) * ((t > 0.8 + 0.3 * seed) & (t < 2.0 + 0.2 * seed))
    x += 0.2 * rng.standard_normal(t.shape) * ((t > 2.8) & (t < 3.9 - 0.2 * seed))
    return x.astype(np.float32)


def single_stream_events(checkpoint, audio, backend):
    stepper, config, _ = make_stepper(checkpoint, backend)
    engine = DetectionEngine(stepper, config, frames_per_step=8)
    items = engine.push_audio(audio) + engine.flush()
    return [e for e in items if isinstance(e, SoundEvent)]


def _key(events):
    return sorted((e.label, round(e.onset_s, 6), round(e.offset_s, 6)) for e in events)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_stalled_stream_holds_no_one_back_and_every_stream_completes_exactly(checkpoint, backend, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("RTSED_ONNX_CACHE", str(tmp_path))
    audios = {0: signal(0), 1: signal(1), 2: signal(2, seconds=3.3)}
    stepper, config, _ = make_stepper(checkpoint, backend, batch_size=4)
    engine = MultiStreamEngine(stepper, config, frames_per_step=8)
    block = 1234  # not a multiple of the hop: partial frames carry over between pushes
    sent = {slot: 0 for slot in audios}
    events: dict[int, list] = {slot: [] for slot in audios}
    engine.start(0)
    engine.start(1)
    engine.start(2, decoder_overrides={"a": 0.7})
    stepped_while_stalled = 0
    for tick in range(400):
        for slot, audio in audios.items():
            stalled = slot == 1 and 20 <= tick < 45  # stream 1 sends nothing for 25 blocks
            if stalled or not engine.active[slot] or engine.ending[slot]:
                continue
            if sent[slot] < len(audio):
                engine.push_audio(slot, audio[sent[slot]:sent[slot] + block])
                sent[slot] += block
            else:
                engine.end(slot)
        while engine.ready():
            result = engine.step()
            if 20 <= tick < 45 and 0 in result or (20 <= tick < 45 and engine.queued[0] < engine.frames_per_step):
                stepped_while_stalled += 1
            for slot, items in result.items():
                events[slot] += [e for e in items if isinstance(e, SoundEvent)]
        if not engine.active.any():
            break
    assert not engine.active.any(), "every stream should have completed"
    assert stepped_while_stalled > 0, "stream 0 should keep stepping while stream 1 is stalled"
    for slot, audio in audios.items():
        if slot == 2:
            stepper2, config2, _ = make_stepper(checkpoint, backend)
            ref_engine = DetectionEngine(stepper2, config2, frames_per_step=8, decoder_overrides={"a": 0.7})
            ref = [e for e in ref_engine.push_audio(audio) + ref_engine.flush() if isinstance(e, SoundEvent)]
        else:
            ref = single_stream_events(checkpoint, audio, backend)
        assert ref, "the fixture model should produce events"
        assert _key(events[slot]) == _key(ref), f"stream {slot}"
        for a, b in zip(sorted(events[slot], key=lambda e: (e.label, e.onset_s)),
                        sorted(ref, key=lambda e: (e.label, e.onset_s))):
            assert a.score == pytest.approx(b.score, abs=1e-4)


def test_a_slot_is_reusable_after_end_and_holding_leaves_the_held_stream_exact(checkpoint):
    """A held stream's state survives many steps of the others (including their ring wrapping
    around), and a completed slot starts afresh."""
    stepper, config, _ = make_stepper(checkpoint, "torch", batch_size=2)
    engine = MultiStreamEngine(stepper, config, frames_per_step=4)
    a, b = signal(3), signal(4)
    half = len(b) // 2
    engine.start(0)
    engine.start(1)
    got = {0: [], 1: []}
    engine.push_audio(1, b[:half])
    engine.push_audio(0, a)  # stream 0 runs the whole signal while stream 1 waits
    held_steps = 0
    for ending in (False, True):
        if ending:
            engine.end(0)
        while engine.ready():
            held_steps += int(engine.queued[1] < 4)
            for slot, items in engine.step().items():
                got[slot] += [e for e in items if isinstance(e, SoundEvent)]
    assert not engine.active[0] and engine.active[1]
    assert held_steps > 25, "stream 1 should have been held through most of stream 0"
    engine.push_audio(1, b[half:])
    engine.end(1)
    engine.start(0)  # the freed slot, reused
    engine.push_audio(0, b)
    engine.end(0)
    got[0] = []
    while engine.ready():
        for slot, items in engine.step().items():
            got[slot] += [e for e in items if isinstance(e, SoundEvent)]
    ref = single_stream_events(checkpoint, b, "torch")
    assert ref and _key(got[1]) == _key(ref) and _key(got[0]) == _key(ref)
