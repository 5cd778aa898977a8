"""rtsed.cluster without a network: what a worker that takes a stream over relies on. A stream
resumed on a fresh engine from a decoder snapshot, its audio fed again from P frames before
(the model's past context), gives exactly the events of the uninterrupted run from there on
(the bundled detector on the serve tests' scene, resumed inside events and between them);
audio blocks, partitions and the server's mapping are what the gateway and workers agree on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rtsed.cluster.subjects import (AudioBlock, Partition, decode_block, encode_block, server_config,
                                    server_mapping, stream_of)
from rtsed.cluster.worker import past_context_frames, receptive_field_s
from rtsed.models.bundled import resolve_model
from rtsed.serve.decode import EventDecoder, SoundEvent
from rtsed.serve.engine import MultiStreamEngine, make_stepper

from serve_helpers import make_scene

BLOCK = 640  # samples per push: the gateway's default block (0.04 s at 16 kHz)


def _run(stepper, config, audio: np.ndarray, first_sample: int = 0, decoder_state=None, skip_frames: int = 0):
    """One stream through a fresh MultiStreamEngine slot from ``first_sample`` to the end ->
    (items, [(decoder's next frame, snapshot, items so far)] after every step)."""
    engine = MultiStreamEngine(stepper, config, frames_per_step=4)
    engine.start(0, decoder_state=decoder_state, skip_frames=skip_frames)
    items, points = [], []
    for i in range(first_sample, audio.shape[0], BLOCK):
        engine.push_audio(0, audio[i:i + BLOCK])
        while engine.ready():
            items += engine.step().get(0, [])
            points.append((engine.decoders[0].next_frame, engine.decoders[0].snapshot(), len(items)))
    engine.end(0)
    while engine.active[0]:
        items += engine.step().get(0, [])
    return items, points


def _key(item):
    if isinstance(item, SoundEvent):
        return ("event", item.label, round(item.onset_s, 6), round(item.offset_s, 6))
    return ("onset", item.label, round(item.onset_s, 6))


def _assert_resumes_exactly(stepper, config, past: int, audio: np.ndarray, fractions) -> None:
    items, points = _run(stepper, config, audio)
    assert sum(isinstance(i, SoundEvent) for i in items) >= 3, "the scene should give events to compare"
    hop = config.frontend.hop_samples
    for fraction in fractions:
        frame, state, n_before = points[int(fraction * (len(points) - 1))]
        state = json.loads(json.dumps(state))  # through the wire, as a resume point travels
        start = max(0, frame - past)
        resumed, _ = _run(stepper, config, audio, start * hop, state, frame - start)
        assert [_key(i) for i in resumed] == [_key(i) for i in items[n_before:]], f"resumed at frame {frame}"
        np.testing.assert_allclose([i.score for i in resumed], [i.score for i in items[n_before:]], atol=1e-4)


def test_the_bundled_detector_resumes_exactly_mid_event():
    stepper, config, model = make_stepper(resolve_model("dnd_7_10"), "torch")
    past = past_context_frames(model)
    assert past == 36 and stepper.lookahead_frames == 36
    assert receptive_field_s(past, stepper.lookahead_frames, config) == pytest.approx(1.48)
    # Resume points inside the first rain event (0.4 s: its past reaches back before the stream's
    # start; 1.2 s), inside speech and sneezing (2.9 s), inside the second rain (4.5 s) and
    # between events (7.0 s).
    audio = make_scene()
    items, points = _run(stepper, config, audio)
    fractions = [next(i for i, p in enumerate(points) if p[0] >= t / 0.02) / (len(points) - 1)
                 for t in (0.4, 1.2, 2.9, 4.5, 7.0)]
    _assert_resumes_exactly(stepper, config, past, audio, fractions)


def test_a_recurrent_model_is_refused_with_the_reason():
    from rtsed.config import ModelConfig
    from rtsed.models.model import SEDModel

    model = SEDModel(ModelConfig.from_name("base", n_classes=2, channels=8))
    with pytest.raises(ValueError, match="receptive field is unbounded"):
        past_context_frames(model)


def test_decoder_snapshot_continues_the_stream_exactly():
    rng = np.random.default_rng(0)
    probs = rng.random((300, 3)) ** 2
    labels = ("a", "b", "c")
    whole = EventDecoder(labels, 0.02)
    expected = whole.push(probs) + whole.flush()
    first = EventDecoder(labels, 0.02)
    head = first.push(probs[:137])
    second = EventDecoder(labels, 0.02)
    second.restore(json.loads(json.dumps(first.snapshot())))
    assert second.next_frame == 137
    assert head + second.push(probs[137:]) + second.flush() == expected
    with pytest.raises(ValueError, match="restore a snapshot of the same model"):
        EventDecoder(("a", "b"), 0.02).restore(first.snapshot())


@pytest.mark.parametrize("sample_format", ["f32le", "s16le"])
def test_audio_blocks_carry_what_a_worker_needs(sample_format):
    x = np.linspace(-0.5, 0.5, 640, dtype=np.float32)
    block = AudioBlock("gw.7", 12, 640 * 12, 16000, x, "porch", {"dog": [0.6, 0.3]}, end=True)
    payload, headers = encode_block(block, sample_format)
    assert headers["Rtsed-T-S"] == "0.480000" and headers["Nats-Msg-Id"] == "gw.7.12"
    back = decode_block("rtsed.audio.1.gw.7", payload, headers)
    assert (back.stream, back.seq, back.first_sample, back.rate_hz, back.name, back.thresholds, back.end) == \
           ("gw.7", 12, 7680, 16000, "porch", {"dog": [0.6, 0.3]}, True)
    np.testing.assert_allclose(back.samples, x, atol=1 / 32768 if sample_format == "s16le" else 0)
    with pytest.raises(ValueError, match="bad or missing header"):
        decode_block("rtsed.audio.1.gw.7", payload, {"Rtsed-Format": sample_format})


def test_partitions_and_the_server_mapping():
    assert Partition.parse("1/3") == Partition(1, 3) and Partition(1, 3).lease_key == "p1of3"
    for bad in ("3/3", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="--partition"):
            Partition.parse(bad)
    assert server_mapping(4) == ("rtsed.in.*.*", "rtsed.audio.{{partition(4,1,2)}}.{{wildcard(1)}}.{{wildcard(2)}}")
    config = server_config(4, 4222, "/data")
    assert "listen: 0.0.0.0:4222" in config and 'store_dir: "/data"' in config and server_mapping(4)[1] in config
    assert stream_of("rtsed.audio.3.gw.12") == "gw.12" == stream_of("rtsed.events.gw.12")



def test_worker_command_line_names_the_problem_and_the_fix(capsys):
    from rtsed.cli.worker import main

    base = ["--model", "dnd_7_10", "--nats", "nats://127.0.0.1:4222"]
    cases = [
        (["--partition", "2/2"], "K must lie in 0..N-1"),
        (["--partition", "0/2", "--partition", "1/3"], "every partition must be of the same N"),
        (["--partition", "0/2", "--retention-s", "2"], "a takeover needs at least the receptive field (1.48 s)"),
    ]
    for extra, expected in cases:
        assert main(base + extra) == 2
        assert expected in capsys.readouterr().err, extra
    assert main(["--model", "dnd_7_10", "--nats", "127.0.0.1:4222", "--partition", "0/1"]) == 2
    assert "give a NATS URL, e.g. nats://127.0.0.1:4222" in capsys.readouterr().err
