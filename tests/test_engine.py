"""The streaming engine: front end + model state + decoder, on torch and onnxruntime, one stream
and many. Its events must equal offline detection's (whole file -> probabilities -> decoder)."""

import numpy as np
import pytest
import torch

import rtsed
from rtsed.serve.decode import OnsetNotice, SoundEvent
from rtsed.serve.engine import DetectionEngine, MultiStreamEngine, make_stepper

from engine_helpers import RATE, offline_events, same_events, scene

@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("block", [320, 1000, 7919])
def test_engine_events_equal_offline_detection(checkpoint, backend, block, tmp_path, monkeypatch):
    monkeypatch.setenv("RTSED_ONNX_CACHE", str(tmp_path))
    audio = scene()
    expected, probs = offline_events(checkpoint, audio)
    assert expected, "the fixture model should produce some events"
    stepper, config, _ = make_stepper(checkpoint, backend)
    engine = DetectionEngine(stepper, config, frames_per_step=3, keep_probabilities=True)
    items = []
    for start in range(0, audio.shape[0], block):
        items += engine.push_audio(audio[start:start + block])
    items += engine.flush()
    events = [e for e in items if isinstance(e, SoundEvent)]
    assert same_events(events, expected)
    np.testing.assert_allclose(engine.probabilities(), probs, atol=2e-5, rtol=1e-4)
    notices = [e for e in items if isinstance(e, OnsetNotice)]
    assert len(notices) == len(events)
    # Every notice precedes its event in the output order.
    for n in notices:
        i = items.index(n)
        assert any(isinstance(e, SoundEvent) and e.label == n.label and e.onset_s == n.onset_s for e in items[i:])


def test_engine_reports_latency_and_compute(checkpoint):
    stepper, config, model = make_stepper(checkpoint, "torch")
    engine = DetectionEngine(stepper, config, frames_per_step=4, extra_latency_s=0.005)
    assert engine.lookahead_frames == model.lookahead_frames == 3 * 2 + 10
    # window 40 ms + (16 lookahead + 3 buffered) hops of 20 ms + 5 ms resampler
    assert engine.algorithmic_latency_s == pytest.approx(0.04 + 19 * 0.02 + 0.005)
    engine.push_audio(scene(1.0))
    assert engine.stats.steps > 0 and engine.stats.compute_ms_per_hop() > 0


def test_engine_runs_the_front_end_once_per_model_step(checkpoint, monkeypatch):
    """Audio blocks are held back until they complete a step's frames: one front-end call per
    model step, not one per block, and every step still gets exactly frames_per_step frames."""
    stepper, config, _ = make_stepper(checkpoint, "torch")
    engine = DetectionEngine(stepper, config, frames_per_step=4)
    calls, steps = [], []
    real_push, real_step = engine.logmel.push, stepper.step
    monkeypatch.setattr(engine.logmel, "push", lambda x: calls.append(len(x)) or real_push(x))
    monkeypatch.setattr(stepper, "step", lambda x: steps.append(x.shape[1]) or real_step(x))
    audio = scene(2.0)
    hop = config.frontend.hop_samples
    for start in range(0, len(audio), hop):
        engine.push_audio(audio[start:start + hop])
    assert len(steps) == len(calls) > 20 and set(steps) == {4}


def test_engine_refuses_a_bad_block_at_once_and_keeps_the_held_audio(checkpoint):
    stepper, config, _ = make_stepper(checkpoint, "torch")
    hop = config.frontend.hop_samples
    audio = scene(2.0, seed=5)
    probabilities = []
    for bad in (False, True):
        engine = DetectionEngine(stepper.__class__(rtsed.load_model(checkpoint), config), config,
                                 frames_per_step=4, keep_probabilities=True)
        for i, start in enumerate(range(0, len(audio), hop)):
            if bad and i == 30:  # a block while earlier ones are held back
                broken = audio[start:start + hop].copy()
                broken[7] = np.nan
                with pytest.raises(ValueError, match="is nan, not finite"):
                    engine.push_audio(broken)
            engine.push_audio(audio[start:start + hop])
        engine.flush()
        probabilities.append(engine.probabilities())
    np.testing.assert_array_equal(probabilities[0], probabilities[1])


def test_engine_reset_and_flushed_stream(checkpoint):
    stepper, config, _ = make_stepper(checkpoint, "torch")
    engine = DetectionEngine(stepper, config)
    audio = scene(seed=3)
    first = [e for e in engine.push_audio(audio) + engine.flush() if isinstance(e, SoundEvent)]
    with pytest.raises(RuntimeError, match="reset"):
        engine.push_audio(audio)
    engine.reset()
    again = [e for e in engine.push_audio(audio) + engine.flush() if isinstance(e, SoundEvent)]
    assert same_events(first, again)


def test_multistream_slots_are_independent(checkpoint):
    """Three slots in one batched call, started at different times: each slot's events equal
    the single-stream events of its own signal (up to the lookahead it never flushed)."""
    audios = [scene(seed=s) for s in (0, 1, 2)]
    stepper, config, _ = make_stepper(checkpoint, "torch", batch_size=3)
    multi = MultiStreamEngine(stepper, config, frames_per_step=8)
    hop = config.frontend.hop_samples
    block = hop * 8
    events = {0: [], 1: [], 2: []}
    offsets = {0: 0, 1: 0, 2: 0}
    multi.start(0)
    multi.start(2)
    for k in range(0, 40):
        if k == 5:
            multi.start(1)  # joins late
        for slot in np.flatnonzero(multi.active):
            a = audios[slot]
            multi.push_audio(int(slot), a[offsets[slot]:offsets[slot] + block] if offsets[slot] < len(a)
                             else np.zeros(block, np.float32))
            offsets[slot] += block
        while multi.ready():
            for slot, items in multi.step().items():
                events[slot] += [e for e in items if isinstance(e, SoundEvent)]
    single_stepper, _, _ = make_stepper(checkpoint, "torch")
    for slot in (0, 1, 2):
        single = DetectionEngine(single_stepper, config, frames_per_step=8)
        single_stepper.reset()
        ref = [e for e in single.push_audio(audios[slot]) if isinstance(e, SoundEvent)]
        # Events that ended well before the signal's end are final in both.
        cutoff = len(audios[slot]) / RATE - 1.0
        assert same_events([e for e in events[slot] if e.offset_s < cutoff], [e for e in ref if e.offset_s < cutoff])


def test_make_stepper_errors(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="backend"):
        make_stepper(checkpoint, "tensorrt")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            make_stepper(checkpoint, "torch", device="cuda")
