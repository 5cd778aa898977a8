"""Real endpoints for the server's event outputs: a mosquitto broker, a paho-mqtt subscriber
that records what it is sent, and a stdlib HTTP server that records webhook POSTs."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


class Broker:
    """``mosquitto`` on 127.0.0.1:``port``; ``persistent``: sessions and queued messages survive
    a restart (saved on SIGTERM)."""

    def __init__(self, port: int, folder: Path, persistent: bool = False):
        self.port = port
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "max_queued_messages 100000",
                 "user root"]  # as root, stay root: the persistence folder is ours
        if persistent:
            lines += ["persistence true", f"persistence_location {folder}/", "autosave_interval 0"]
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None
        self.log = None

    def start(self) -> "Broker":
        self.log = open(self.folder / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=self.log, stderr=subprocess.STDOUT)

        def listening():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self.folder / 'mosquitto.log').read_text()[-1000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, 10, "mosquitto to listen")
        return self

    def stop(self) -> None:
        """Stops mosquitto if it runs (SIGTERM saves a persistent broker's queues; SIGKILL after 10 s);
        safe to call again, or before start()."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.log is not None:
            self.log.close()


class Subscriber:
    """A paho-mqtt client subscribed to ``#`` with QoS 1; ``messages``: (topic, text, retain) in
    arrival order. ``persistent``: a session the broker keeps (queues messages) while this client
    is disconnected; it reconnects by itself."""

    def __init__(self, port: int, persistent: bool = False, client_id: str = "rtsed-test-subscriber"):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, str, bool]] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=not persistent)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        try:
            wait_until(self.subscribed.is_set, 10, "the subscription")
        except BaseException:
            self.close()  # no network thread left behind by a failed test
            raise

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload.decode(), bool(message.retain)))

    def on(self, topic: str) -> list[str]:
        with self._lock:
            return [text for t, text, _ in self.messages if t == topic]

    def matching(self, suffix: str) -> list[tuple[str, str]]:
        with self._lock:
            return [(t, text) for t, text, _ in self.messages if t.endswith(suffix)]

    def events(self, stream: str) -> list[tuple[str, float, float, float]]:
        """The event payloads of one stream, sorted, as (label, onset_s, offset_s, score)."""
        out = []
        for topic, text in self.matching("/event"):
            if topic.startswith(f"rtsed/{stream}/"):
                m = json.loads(text)
                out.append((m["label"], m["onset_s"], m["offset_s"], m["score"]))
        return sorted(out)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class HookServer:
    """A real HTTP server on loopback recording the JSON bodies POSTed to it; the first
    ``fail_first`` requests are answered ``fail_status`` (503: the poster retries)."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503):
        self.bodies: list[dict] = []
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.requests += 1
                if owner.requests <= fail_first:
                    self.send_response(fail_status)
                    self.end_headers()
                    return
                owner.bodies.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
