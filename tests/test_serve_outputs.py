"""Detections out of ``python -m rtsed.serve``: ``--mqtt`` against a real mosquitto broker (Home
Assistant discovery, ON/OFF states, onset and event payloads equal to what the WebSocket
client got; the broker down at start and mid-run; the last will) and ``--webhook`` against a
real HTTP server (every finished event, retried through failures, counted in the metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("websockets", reason="the server tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("paho.mqtt", reason="--mqtt needs the serve extra: pip install -e '.[serve]'")

from outputs_helpers import MOSQUITTO, Broker, HookServer, Subscriber, wait_until  # noqa: E402
from serve_helpers import ServerProcess, file_payload, free_port, stream_file, write_scene_files  # noqa: E402
from rtsed.serve.mqtt import parse_mqtt_url  # noqa: E402
from rtsed.serve.outputs import slugify  # noqa: E402

needs_broker = pytest.mark.skipif(MOSQUITTO is None, reason="no mosquitto binary: apt-get install mosquitto")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return write_scene_files(tmp_path_factory.mktemp("scenes"))["16k_mono_s16"]


@pytest.fixture
def cleanup():
    """An ExitStack whose callbacks run when the test ends, passed or failed: a failing test must not
    leave a mosquitto (or a subscriber's network thread) running into the rest of the suite."""
    with contextlib.ExitStack() as stack:
        yield stack


def ws_events(got: dict) -> list[tuple[str, float, float, float]]:
    return sorted((m["label"], m["onset_s"], m["offset_s"], m["score"])
                  for m in got["messages"] if m["type"] == "event")


def metric(text: str, name: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")]
    return sum(float(line.split()[-1]) for line in lines)


# ------------------------------------------------------------------------------ units
def test_mqtt_urls_and_slugs():
    s = parse_mqtt_url("mqtt://user:p%40ss@broker.lan")
    assert (s.host, s.port, s.username, s.password, s.tls) == ("broker.lan", 1883, "user", "p@ss", False)
    assert parse_mqtt_url("mqtts://b:9000").port == 9000 and parse_mqtt_url("mqtts://b").port == 8883
    for url, problem in (("http://b:1883", "unknown scheme"), ("mqtt://b:99999", "port"), ("mqtt://:1883", "no host"),
                         ("mqtt://b:1883/topic", "no path")):
        with pytest.raises(ValueError, match=problem):
            parse_mqtt_url(url)
    assert slugify("Kitchen / Mic #2", "stream1") == "kitchen_mic_2"
    assert slugify("   ", "stream7") == "stream7"


def test_webhook_does_not_retry_a_refusal_and_counts_it():
    """HTTP 400 is the endpoint refusing the event: counted as failed, not retried; the next
    event is delivered."""
    from rtsed.serve.decode import SoundEvent
    from rtsed.serve.outputs import StreamRef
    from rtsed.serve.telemetry import ServerMetrics
    from rtsed.serve.webhook import WebhookPoster

    hook = HookServer(fail_first=1, fail_status=400)
    metrics = ServerMetrics()
    poster = WebhookPoster(hook.url, metrics, backoff_s=0.01)
    poster.start()
    stream = StreamRef(1, "hall", "Hall")
    try:
        poster.emit(stream, SoundEvent("dog", 1.0, 2.0, 0.9))
        poster.emit(stream, SoundEvent("rain", 3.0, 4.5, 0.8))
        wait_until(lambda: hook.bodies, 10, "the second event")
    finally:
        poster.close(5.0)
        hook.close()
    assert hook.requests == 2 and [b["label"] for b in hook.bodies] == ["rain"]
    assert hook.bodies[0] == {"type": "event", "label": "rain", "onset_s": 3.0, "offset_s": 4.5, "score": 0.8,
                              "stream": "hall", "stream_id": 1, "name": "Hall"}
    sample = metrics.registry.get_sample_value
    assert sample("rtsed_webhook_posts_total", {"result": "failed"}) == 1
    assert sample("rtsed_webhook_posts_total", {"result": "delivered"}) == 1
    assert sample("rtsed_webhook_retries_total") == 0
    with pytest.raises(ValueError, match="give an http:// or https:// URL"):
        WebhookPoster("ftp://x/y", metrics)


# ------------------------------------------------------------------------------ a real broker
@needs_broker
def test_mqtt_and_webhook_carry_the_events_the_websocket_client_got(scene, tmp_path, cleanup):
    broker = Broker(free_port(), tmp_path / "broker")
    cleanup.callback(broker.stop)
    broker.start()
    subscriber = Subscriber(broker.port)
    cleanup.callback(subscriber.close)
    hook = HookServer(fail_first=2)  # the first two POSTs get 503: the poster retries
    server = ServerProcess("--mqtt", f"mqtt://127.0.0.1:{broker.port}", "--webhook", hook.url,
                           "--max-ahead-s", "30", log_path=tmp_path / "server.log")
    try:
        wait_until(lambda: subscriber.on("rtsed/status") == ["online"], 30, "the server's birth message")
        header, payload = file_payload(scene, "s16le")
        got = asyncio.run(stream_file(server.ws_url, {**header, "name": "Kitchen Mic"}, payload))
        expected = ws_events(got)
        assert len(expected) >= 5 and got["close_code"] == 1000
        stream = "kitchen_mic"
        wait_until(lambda: subscriber.on(f"rtsed/{stream}/status")[-1:] == ["offline"], 30, "the stream's end")
        labels = got["messages"][0]["labels"]

        # Home Assistant discovery: one retained binary_sensor config per class of the stream.
        for label in labels:
            topic = f"homeassistant/binary_sensor/rtsed_{stream}/{label}/config"
            retained = [(text, r) for t, text, r in subscriber.messages if t == topic]
            assert retained, f"no discovery config on {topic}"
            config = json.loads(retained[0][0])
            assert config["state_topic"] == f"rtsed/{stream}/{label}/state"
            assert (config["payload_on"], config["payload_off"]) == ("ON", "OFF")
            assert config["unique_id"] == f"rtsed_{stream}_{label}" and config["device_class"] == "sound"
            assert [a["topic"] for a in config["availability"]] == ["rtsed/status", f"rtsed/{stream}/status"]
            assert config["device"]["identifiers"] == [f"rtsed_{stream}"]
        assert subscriber.on(f"rtsed/{stream}/status") == ["online", "offline"]

        # The events, onsets and ON/OFF states equal what the WebSocket client was sent.
        assert subscriber.events(stream) == expected
        mqtt_onsets = sorted((json.loads(text)["label"], json.loads(text)["onset_s"])
                             for _, text in subscriber.matching("/onset"))
        assert mqtt_onsets == sorted(got["onsets"])
        for label in labels:
            states = subscriber.on(f"rtsed/{stream}/{label}/state")
            n = sum(1 for e in expected if e[0] == label)
            assert states == ["OFF"] + ["ON", "OFF"] * n, (label, states)
        first = json.loads(subscriber.matching("/event")[0][1])
        assert first["stream"] == stream and first["name"] == "Kitchen Mic" and first["type"] == "event"

        # The webhook got every finished event, through two 503s (retried, counted).
        wait_until(lambda: len(hook.bodies) == len(expected), 30, "every webhook POST")
        assert sorted((b["label"], b["onset_s"], b["offset_s"], b["score"]) for b in hook.bodies) == expected
        assert all(b["stream"] == stream for b in hook.bodies)
        metrics = server.get_text("/metrics")
        assert metric(metrics, 'rtsed_webhook_posts_total{result="delivered"}') == len(expected)
        assert metric(metrics, "rtsed_webhook_retries_total") == 2
        assert metric(metrics, "rtsed_mqtt_connected") == 1
        assert metric(metrics, 'rtsed_mqtt_messages_total{result="published"}') >= len(subscriber.messages) - 1
    finally:
        code = server.stop(signal.SIGTERM)
        hook.close()
    assert code == 0
    # A clean stop says "offline" itself (the broker keeps it: retained).
    wait_until(lambda: subscriber.on("rtsed/status")[-1:] == ["offline"], 10, "the server's offline message")


@needs_broker
def test_broker_down_at_start_and_mid_run_loses_nothing_and_the_will_says_offline(scene, tmp_path, cleanup):
    """The server starts with its broker down, a stream runs (its client gets every event), the
    broker comes up and receives them; the broker restarts mid-run, a second stream runs, and
    its events arrive too. Killed, the server's last will marks it offline."""
    port = free_port()
    broker = Broker(port, tmp_path / "broker", persistent=True)
    cleanup.callback(broker.stop)  # whichever state a failure leaves it in
    broker.start()
    subscriber = Subscriber(port, persistent=True)  # the broker queues for it while it is away
    cleanup.callback(subscriber.close)
    broker.stop()
    server = ServerProcess("--mqtt", f"mqtt://127.0.0.1:{port}", "--mqtt-reconnect-max-s", "2",
                           "--max-ahead-s", "30", log_path=tmp_path / "server.log")
    try:
        header, payload = file_payload(scene, "s16le")
        first = asyncio.run(stream_file(server.ws_url, {**header, "name": "porch"}, payload))
        assert len(ws_events(first)) >= 5 and first["close_code"] == 1000
        assert "MQTT: cannot reach the broker at mqtt://127.0.0.1:" in server.log_path.read_text()
        broker.start()
        wait_until(lambda: subscriber.events("porch") == ws_events(first), 30, "the first stream's events")
        assert subscriber.on("rtsed/porch/status")[-1:] == ["offline"]

        broker.stop()  # mid-run
        second = asyncio.run(stream_file(server.ws_url, {**header, "name": "garage"}, payload))
        assert ws_events(second) == ws_events(first)
        broker.start()
        wait_until(lambda: subscriber.events("garage") == ws_events(second), 30, "the second stream's events")
        wait_until(lambda: "MQTT: lost the broker" in server.log_path.read_text(), 5, "the outage's log line")
        assert server.get_json("/health")["status"] == "ok"
    finally:
        server.stop(signal.SIGKILL)
    wait_until(lambda: subscriber.on("rtsed/status")[-1:] == ["offline"], 10, "the last will")
