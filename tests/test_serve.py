"""``python -m rtsed.serve``: a real server process (uvicorn) on loopback, real ``websockets``
clients. The events a client receives equal those of ``rtsed.detect`` on the same file, for
concurrent streams at different rates, channel counts and sample formats; streams end on the
client's word, on silence and on shutdown with their events closed and sent; health, streams
and metrics report what happened."""

from __future__ import annotations

import asyncio
import json
import signal

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("starlette", reason="the server needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("websockets", reason="the server tests need the serve extra: pip install -e '.[serve]'")

from serve_helpers import (ServerProcess, assert_same_events, detect_events, file_payload,  # noqa: E402
                           stream_file, write_scene_files)
from rtsed.serve.protocol import (CLOSE_BAD_DATA, ProtocolError, SampleDecoder, StreamHeader,  # noqa: E402
                                  close_reason, parse_header)

LABELS = ("dog", "rain")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scene_files(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess("--max-ahead-s", "30", "--idle-timeout-s", "3", "--send-timeout-s", "1.5",
                        "--max-streams", "4", log_path=tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    srv.stop()


# ------------------------------------------------------------------------------ protocol units
def test_header_parsing_names_the_problem_and_the_fix():
    h = parse_header('{"sample_rate": 48000, "channels": 2, "format": "s16le", "thresholds": {"dog": [0.6, 0.3]}}',
                     LABELS)
    assert (h.sample_rate_hz, h.channels, h.sample_format, h.thresholds) == (48000, 2, "s16le", {"dog": (0.6, 0.3)})
    assert h.bytes_per_second == 48000 * 2 * 2
    cases = {
        "{nope": "not JSON",
        "[1]": "expected a JSON object",
        '{"sample_rate": 16000}': "missing channels, format",
        '{"sample_rate": 16000, "channels": 1, "format": "f64le"}': "format 'f64le' is not supported; use one of",
        '{"sample_rate": 12.5, "channels": 1, "format": "f32le"}': "integer rate",
        '{"sample_rate": 16000, "channels": 0, "format": "f32le"}': "channels 0",
        '{"sample_rate": 16000, "channels": 1, "format": "f32le", "thresholds": {"cat": 0.5}}': "unknown label 'cat'",
        '{"sample_rate": 16000, "channels": 1, "format": "f32le", "thresholds": {"dog": [0.3, 0.6]}}': "exceeds on",
        '{"sample_rate": 16000, "channels": 1, "format": "f32le", "rate": 1}': "unknown field(s) ['rate']",
    }
    for text, expected in cases.items():
        with pytest.raises(ProtocolError) as info:
            parse_header(text, LABELS)
        assert info.value.code == CLOSE_BAD_DATA and expected in info.value.message, (text, info.value.message)
    assert len(close_reason("é" * 200).encode()) <= 123


def test_sample_decoder_carries_split_frames():
    header = StreamHeader(16000, 2, "s16le")
    x = (np.arange(40, dtype=np.int16).reshape(20, 2) * 100).astype("<i2")
    raw = x.tobytes()
    dec = SampleDecoder(header)
    parts = [dec.decode(raw[i:i + 7]) for i in range(0, len(raw), 7)]  # 7 bytes: frames split anywhere
    got = np.concatenate(parts)
    np.testing.assert_array_equal(got, x.astype(np.float32) / 32768)


# ------------------------------------------------------------------------------ a real server
def test_concurrent_streams_at_different_rates_get_the_events_of_rtsed_detect(server, scenes):
    """48 kHz stereo float and 16 kHz mono 16-bit at once, sent in messages that cut sample
    frames anywhere: each client's events equal rtsed.detect's on its file."""
    h48, p48 = file_payload(scenes["48k_stereo_f32"], "f32le")
    h16, p16 = file_payload(scenes["16k_mono_s16"], "s16le")

    async def both():
        return await asyncio.gather(stream_file(server.ws_url, h48, p48, chunk_bytes=7681),
                                    stream_file(server.ws_url, h16, p16, chunk_bytes=1001))

    got48, got16 = asyncio.run(both())
    for got, path in ((got48, scenes["48k_stereo_f32"]), (got16, scenes["16k_mono_s16"])):
        expected = detect_events(path)
        assert len(expected) >= 5, "the scene should give the bundled detector several events"
        assert {"rain", "speech"} <= {label for label, *_ in expected}  # what the threshold test turns off
        assert got["close_code"] == 1000 and got["close_reason"] == "client ended the stream"
        assert_same_events(got["events"], expected)
        ready = got["messages"][0]
        assert ready["type"] == "ready" and ready["model"] == "dnd_7_10" and len(ready["labels"]) == 12
        assert got["messages"][-1]["type"] == "end" and got["messages"][-1]["events"] == len(expected)
        # Every finished event was announced by an onset notice first.
        assert sorted(got["onsets"]) == sorted((label, onset) for label, onset, _ in got["events"])
        frames = [m for m in got["messages"] if m["type"] == "frames"]
        assert frames and sum(len(m["mel"]) for m in frames) >= 8.0 / 0.02 - 2
        assert sum(len(m["probs"]) for m in frames) == pytest.approx(8.0 / 0.02, abs=2)
        assert all(len(row) == 40 and all(0 <= v <= 255 for v in row) for m in frames for row in m["mel"])


def test_onnx_backend_gets_the_events_of_rtsed_detect_with_onnx(scenes, tmp_path):
    """``--backend onnx``: the exported step graph in onnxruntime steps every stream; two
    concurrent clients get the events ``rtsed.detect --backend onnx`` finds in their files."""
    pytest.importorskip("onnxruntime", reason="--backend onnx needs onnxruntime: pip install -e '.[cpu]'")
    srv = ServerProcess("--backend", "onnx", "--max-ahead-s", "30", log_path=tmp_path / "server.log")
    try:
        assert srv.get_json("/health")["backend"] == "onnx"
        h48, p48 = file_payload(scenes["48k_stereo_f32"], "f32le")
        h16, p16 = file_payload(scenes["16k_mono_s16"], "s16le")

        async def both():
            return await asyncio.gather(stream_file(srv.ws_url, h48, p48, chunk_bytes=7681),
                                        stream_file(srv.ws_url, h16, p16, chunk_bytes=1001))

        results = asyncio.run(both())
    finally:
        srv.stop()
    for got, path in zip(results, (scenes["48k_stereo_f32"], scenes["16k_mono_s16"])):
        expected = detect_events(path, backend="onnx")
        assert len(expected) >= 5
        assert got["close_code"] == 1000
        assert_same_events(got["events"], expected)
        assert got["messages"][-1]["type"] == "end" and got["messages"][-1]["events"] == len(expected)


def test_threshold_overrides_apply_to_one_stream(server, scenes):
    header, payload = file_payload(scenes["16k_mono_s16"], "s16le")
    strict = {**header, "thresholds": {"rain": 0.99, "speech": [0.9, 0.8]}}
    got = asyncio.run(stream_file(server.ws_url, strict, payload))
    labels = {e[0] for e in got["events"]}
    # Without the overrides the scene gives rain and speech events (test above); with them only
    # the class left alone still fires.
    assert "rain" not in labels and "speech" not in labels and "sneezing" in labels
    ready = got["messages"][0]
    assert ready["on"][ready["labels"].index("rain")] == 0.99
    assert ready["off"][ready["labels"].index("speech")] == 0.8


def test_a_silent_client_is_ended_after_the_idle_timeout_with_its_events(server, scenes, tmp_path):
    header, payload = file_payload(scenes["16k_mono_s16"], "s16le")
    prefix = payload[: 2 * 16000 * 3]  # 3 s, then silence on the wire
    got = asyncio.run(stream_file(server.ws_url, header, prefix, end=False, timeout_s=60))
    assert got["close_code"] == 1000 and got["close_reason"].startswith("no audio for 3 s")
    path = tmp_path / "prefix.wav"
    sf.write(path, np.frombuffer(prefix, "<i2"), 16000, subtype="PCM_16")
    expected = detect_events(path)
    assert expected
    assert_same_events(got["events"], expected)


def test_health_streams_and_metrics(server):
    health = server.get_json("/health")
    assert health["status"] == "ok" and health["model"] == "dnd_7_10" and health["max_streams"] == 4
    listing = server.get_json("/streams")
    assert listing["streams"] == [] and listing["closed"], "earlier streams are listed as closed"
    assert {"reason", "events", "audio_s"} <= set(listing["closed"][0])
    text = server.get_text("/metrics")
    for name in ("rtsed_streams ", "rtsed_steps_total", "rtsed_step_seconds_bucket", "rtsed_dropped_audio_seconds_total",
                 "rtsed_queued_audio_seconds", "rtsed_streams_closed_total", "rtsed_events_total",
                 "rtsed_queue_dropped_audio_seconds_total"):
        assert name in text, name
    # The streams so far were paced within the bounds: nothing was dropped from a full queue.
    assert "rtsed_queue_dropped_audio_seconds_total 0.0" in text
    steps = [line for line in text.splitlines() if line.startswith("rtsed_steps_total")]
    assert float(steps[0].split()[-1]) > 0


def test_shutdown_closes_every_streams_events_and_sends_them_first(scenes, tmp_path):
    """SIGTERM while two streams are open (no end message): each gets its open events closed and
    sent, then a 1001 close; the server exits 0."""
    srv = ServerProcess("--max-ahead-s", "30", "--idle-timeout-s", "60", log_path=tmp_path / "server.log")
    header, payload = file_payload(scenes["16k_mono_s16"], "s16le")
    prefix_s = 3.1  # speech (from 2.5 s) is still sounding here: an open event the shutdown closes
    prefix = payload[: 2 * round(16000 * prefix_s)]

    async def run():
        clients = [asyncio.create_task(stream_file(srv.ws_url, header, prefix, end=False, timeout_s=60))
                   for _ in range(2)]
        for _ in range(200):  # until the server has both streams' audio
            await asyncio.sleep(0.1)
            streams = srv.get_json("/streams")["streams"]
            if len(streams) == 2 and all(s["audio_s"] >= prefix_s - 0.1 for s in streams):
                break
        code = await asyncio.to_thread(srv.stop, signal.SIGTERM)
        return code, await asyncio.gather(*clients)

    code, results = asyncio.run(run())
    assert code == 0, (tmp_path / "server.log").read_text()[-2000:]
    path = tmp_path / "prefix.wav"
    sf.write(path, np.frombuffer(prefix, "<i2"), 16000, subtype="PCM_16")
    expected = detect_events(path)
    for got in results:
        assert got["close_code"] == 1001 and "shutting down" in got["close_reason"]
        assert_same_events(got["events"], expected)
    # The last events were still open when the signal came: closed at the stream's end.
    assert any(abs(e[2] - prefix_s) < 0.05 for e in expected)


def test_the_page_and_its_modules_are_served(server):
    assert "<html" in server.get_text("/").lower()
    assert "<html" in server.get_text("/grid").lower()
    json.dumps(server.get_json("/streams"))
