"""The Stepper protocol: the torch and onnxruntime steppers and ``load_detector(...).stepper()``
implement it, and a new backend is one class: a stepper defined here (a stand-in for a remote
server: every step's arrays cross a byte boundary) drives DetectionEngine and MultiStreamEngine
to the same events as the torch stepper."""

from __future__ import annotations

import io

import numpy as np
import pytest

import rtsed
from rtsed.serve.engine import DetectionEngine, MultiStreamEngine, make_stepper
from rtsed.serve.steppers import OnnxStepper, Stepper, TorchStepper

from engine_helpers import offline_events, same_events, scene  # tests/ is on sys.path


class RemoteStepper:
    """A backend in one class: frames are serialised, "sent", stepped by a server-side stepper,
    and the answer serialised back (np.save round trips, as a network hop would)."""

    def __init__(self, server: Stepper):
        self.server = server
        self.batch_size = server.batch_size
        self.lookahead_frames = server.lookahead_frames

    @staticmethod
    def _wire(*arrays: np.ndarray) -> list[np.ndarray]:
        out = []
        for a in arrays:
            buffer = io.BytesIO()
            np.save(buffer, a)
            buffer.seek(0)
            out.append(np.load(buffer))
        return out

    def step(self, logmel):
        (sent,) = self._wire(np.ascontiguousarray(logmel, np.float32))
        return tuple(self._wire(*self.server.step(sent)))

    def reset(self, streams=None):
        self.server.reset(streams)

    def end(self, streams=None):
        self.server.end(streams)

    def pending_after_end(self, stream=0):
        return self.server.pending_after_end(stream)


def test_the_steppers_implement_the_protocol(checkpoint, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("RTSED_ONNX_CACHE", str(tmp_path))
    torch_stepper, _, _ = make_stepper(checkpoint, backend="torch")
    onnx_stepper, _, _ = make_stepper(checkpoint, backend="onnx")
    detector_stepper = rtsed.load_detector(checkpoint).stepper()
    assert isinstance(torch_stepper, TorchStepper) and isinstance(onnx_stepper, OnnxStepper)
    for stepper in (torch_stepper, onnx_stepper, detector_stepper, RemoteStepper(torch_stepper)):
        assert isinstance(stepper, Stepper)
    assert not isinstance(object(), Stepper)


@pytest.mark.parametrize("make", ["remote", "detector"])
def test_a_new_backend_is_one_class(checkpoint, make):  # noqa: F811
    audio = scene()
    expected, _ = offline_events(checkpoint, audio)
    detector = rtsed.load_detector(checkpoint)
    stepper = RemoteStepper(make_stepper(checkpoint)[0]) if make == "remote" else detector.stepper()
    engine = DetectionEngine(stepper, detector.config)
    events = []
    for i in range(0, len(audio), 1000):
        events += [e for e in engine.push_audio(audio[i:i + 1000]) if isinstance(e, rtsed.serve.decode.SoundEvent)]
    events += [e for e in engine.flush() if isinstance(e, rtsed.serve.decode.SoundEvent)]
    assert expected and same_events(events, expected)


def test_many_streams_through_a_one_class_backend(checkpoint):  # noqa: F811
    audio = scene()
    detector = rtsed.load_detector(checkpoint)
    direct = MultiStreamEngine(detector.stepper(batch_size=2), detector.config, frames_per_step=8)
    remote = MultiStreamEngine(RemoteStepper(detector.stepper(batch_size=2)), detector.config, frames_per_step=8)
    results = []
    for engine in (direct, remote):
        got = {0: [], 1: []}
        for slot in (0, 1):
            engine.start(slot)
        for i in range(0, len(audio), 3200):
            for slot in (0, 1):
                engine.push_audio(slot, audio[i:i + 3200] * (1.0 if slot == 0 else 0.5))
            while engine.ready():
                for slot, events in engine.step().items():
                    got[slot] += [(e.label, e.onset_s, e.offset_s) for e in events if hasattr(e, "offset_s")]
        for slot in (0, 1):
            got[slot] += [(e.label, e.onset_s, e.offset_s) for e in engine.stop(slot)]
        results.append(got)
    assert results[0] == results[1]
    assert results[0][0], "the fixture model should produce some events"
