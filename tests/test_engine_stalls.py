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


# ------------------------------------------------ idle timeout, bounded queues, the 64-stream soak


class TickClock:
    """The engine's clock, advanced by the feeding loop by the audio duration of each tick: the
    wall time of a real-time feed, without sleeping (and without a loaded machine's stalls)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def soak_signal(seed: int, seconds: float) -> np.ndarray:
    """Faint noise with 2-4 tone or noise bursts at random times: float32 (seconds * RATE,)."""
    rng = np.random.default_rng(1000 + seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    x = 0.01 * rng.standard_normal(n)
    for _ in range(rng.integers(2, 5)):
        a = rng.uniform(0.0, seconds - 0.5)
        b = min(seconds, a + rng.uniform(0.3, 1.5))
        on = (t >= a) & (t < b)
        if rng.random() < 0.5:
            x += 0.3 * np.sin(2 * np.pi * rng.uniform(300, 3000) * t) * on
        else:
            x += 0.2 * rng.standard_normal(n) * on
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def dilated_checkpoint(tmp_path_factory):
    return lively_checkpoint(tmp_path_factory.mktemp("soak") / "dnd_3_10.pt", "dnd_3_10", ("a", "b", "c"), seed=2)


def test_one_stalled_and_63_healthy_streams_the_healthy_equal_single_stream_detection(dilated_checkpoint):
    """64 slots in one batch. Slot 0 stops sending in the middle of an event; 63 healthy streams
    send 2-3 s each in 0.1 s blocks, one block per tick of a real-time clock. The stalled stream
    is ended by the idle timeout (1 s) with its open event closed, exactly as single-stream
    detection of the audio it sent; the healthy ones keep stepping meanwhile and each one's
    events equal single-stream detection of its own audio; no queue overflows."""
    n, block, fps = 64, RATE // 10, 16
    # Where slot 0 stalls: halfway through the longest event of its signal, on a block boundary.
    whole = soak_signal(0, 3.0)
    longest = max(single_stream_events(dilated_checkpoint, whole, "torch"), key=lambda e: e.offset_s - e.onset_s)
    cut = int(round((longest.onset_s + longest.offset_s) / 2 * RATE / block)) * block
    stalled = whole[:cut]
    audios = {0: stalled, **{k: soak_signal(k, 2.0 + (k % 4) * 0.3) for k in range(1, n)}}
    stepper, config, _ = make_stepper(dilated_checkpoint, "torch", batch_size=n)
    clock = TickClock()
    engine = MultiStreamEngine(stepper, config, frames_per_step=fps, idle_timeout_s=1.0, max_queue_s=2.0,
                               clock=clock)
    sent = dict.fromkeys(audios, 0)
    events: dict[int, list] = {k: [] for k in audios}
    for slot in audios:
        engine.start(slot)
    stalled_since, ended_at, healthy_steps_while_stalled = None, None, 0
    for tick in range(200):
        for slot, audio in audios.items():
            if not engine.active[slot] or engine.ending[slot]:
                continue
            if sent[slot] < len(audio):
                engine.push_audio(slot, audio[sent[slot]:sent[slot] + block])
                sent[slot] += block
            elif slot != 0:
                engine.end(slot)
        if stalled_since is None and sent[0] >= len(stalled):
            stalled_since = clock.now
        while engine.ready():
            result = engine.step()
            if stalled_since is not None and ended_at is None:
                healthy_steps_while_stalled += bool(set(engine.last_rows) - {0})
            for slot, items in result.items():
                events[slot] += [e for e in items if isinstance(e, SoundEvent)]
            if ended_at is None and not engine.active[0]:
                ended_at = clock.now
        clock.now += block / RATE
        if not engine.active.any():
            break
    assert not engine.active.any(), "every stream should have completed"
    assert engine.timed_out[0] and engine.timed_out.sum() == 1 and engine.stats.idle_ended == 1
    assert 1.0 <= ended_at - stalled_since <= 1.0 + 2 * block / RATE, (stalled_since, ended_at)
    assert healthy_steps_while_stalled > 0, "the healthy streams should step while slot 0 is stalled"
    assert engine.stats.dropped_frames == 0 and not engine.dropped_frames.any()
    ref0 = single_stream_events(dilated_checkpoint, stalled, "torch")
    cut_s = cut / RATE
    assert any(e.label == longest.label and e.offset_s >= cut_s - 0.1 for e in ref0), \
        f"an event open at the stall ({cut_s} s), closed at the end: {ref0}"
    assert _key(events[0]) == _key(ref0)
    with_events = 0
    for slot in range(1, n):
        ref = single_stream_events(dilated_checkpoint, audios[slot], "torch")
        assert _key(events[slot]) == _key(ref), f"stream {slot}"
        with_events += bool(ref)
    assert with_events >= 50, f"only {with_events} of 63 healthy streams had events to compare"


def test_a_full_queue_drops_its_oldest_frames_and_counts_them(checkpoint):
    """max_queue_s = 0.5 s (25 frames): 2 s pushed without a step keeps the newest 25 frames
    (equal to the tail of the whole signal's 99 log-mel frames) and counts the 74 older ones
    dropped."""
    from rtsed.audio.frontend import LogMelStream

    stepper, config, _ = make_stepper(checkpoint, "torch", batch_size=2)
    engine = MultiStreamEngine(stepper, config, frames_per_step=4, max_queue_s=0.5)
    x = signal(5, seconds=2.0)
    engine.start(1)
    for i in range(0, len(x), 3200):
        engine.push_audio(1, x[i:i + 3200])
    whole = LogMelStream(config.frontend).push(x).numpy()
    assert whole.shape[0] == 99 and engine.max_queue_frames == 25
    assert engine.queued[1] == 25 and engine.dropped_frames[1] == 74 and engine.stats.dropped_frames == 74
    # The same frames; the front end's batched FFT may differ in the last bit (parity rule).
    np.testing.assert_allclose(np.concatenate(engine.queues[1]), whole[-25:], atol=1e-5, rtol=1e-4)
    assert engine.queued[0] == 0 and engine.dropped_frames[0] == 0
    engine.start(1)  # a restarted slot starts its count afresh; the engine's total stays
    assert engine.dropped_frames[1] == 0 and engine.stats.dropped_frames == 74


def test_idle_timeout_counts_wall_time_since_the_last_audio(checkpoint):
    stepper, config, _ = make_stepper(checkpoint, "torch", batch_size=3)
    clock = TickClock()
    engine = MultiStreamEngine(stepper, config, frames_per_step=4, idle_timeout_s=2.0, clock=clock)
    engine.start(0)
    engine.start(1)
    clock.now = 1.5
    engine.push_audio(1, signal(6, seconds=0.1))  # slot 1 heard at 1.5 s
    clock.now = 1.9
    assert not engine.idle_slots().any()
    clock.now = 2.0
    assert engine.idle_slots().tolist() == [True, False, False] and engine.ready()
    engine.step()
    assert engine.ending[0] and engine.timed_out[0] and not engine.timed_out[1]
    while engine.ready():
        engine.step()
    assert not engine.active[0] and engine.active[1]
    clock.now = 3.5
    assert engine.idle_slots().tolist() == [False, True, False]
    # A stream started never_idle (a pulled source that reconnects) is not ended however long
    # it is silent; a slot restarted without it times out again.
    engine.start(2, never_idle=True)
    clock.now = 100.0
    assert engine.idle_slots().tolist() == [False, True, False]
    engine.start(2)
    clock.now = 102.0
    assert engine.idle_slots().tolist() == [False, True, True]
    with pytest.raises(ValueError, match="idle_timeout_s must be > 0"):
        MultiStreamEngine(stepper, config, idle_timeout_s=0)
    with pytest.raises(ValueError, match="max_queue_s must hold at least one step"):
        MultiStreamEngine(stepper, config, frames_per_step=16, max_queue_s=0.1)
