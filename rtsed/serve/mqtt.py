"""Detections out over MQTT, with Home Assistant discovery (``rtsed.serve --mqtt mqtt://host:port``).

Topics (``P`` = ``--mqtt-prefix``, default ``rtsed``; ``S`` = the stream's slug; ``L`` = the
label's slug; ``D`` = ``--mqtt-discovery-prefix``, default ``homeassistant``)::

    P/status                         "online" / "offline" (retained; the broker sends "offline"
                                     itself if the server dies: last will)
    P/S/status                       "online" while the stream is live, then "offline" (retained)
    P/S/L/state                      "ON" at an onset, "OFF" when the event ends (retained)
    P/S/L/onset                      {"type": "onset", "label", "onset_s", "stream", ...}
    P/S/L/event                      {"type": "event", "label", "onset_s", "offset_s", "score", ...}
    D/binary_sensor/P_S/L/config     Home Assistant discovery: one binary_sensor per stream and
                                     class, available while both status topics say "online"
                                     (retained)

Times are stream seconds from the stream's first sample, as on the WebSocket. Everything is
published with QoS 1.

Threads: the batching worker only puts items on a bounded queue (``EventOutput``); a publisher
thread turns them into messages and hands them to paho, whose own network thread connects,
sends and reconnects with exponential backoff (``reconnect_min_s`` doubling to
``reconnect_max_s``). While the broker is unreachable paho keeps up to ``max_queued`` messages
and sends them once it is back; each (re)connection republishes the availability, the
discovery configs and the states of the live streams, so a broker restarted without
persistence learns them again. A broker that is down at start or goes away mid-run is logged
once per outage; the streams and their WebSocket clients never wait for it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from rtsed.serve.decode import OnsetNotice, SoundEvent
from rtsed.serve.outputs import EventOutput, StreamRef, item_payload, slugify
from rtsed.serve.telemetry import ServerMetrics

log = logging.getLogger("rtsed.serve.mqtt")

ONLINE, OFFLINE = "online", "offline"
ON, OFF = "ON", "OFF"


@dataclass(frozen=True)
class MqttSettings:
    """Where and how to publish. ``reconnect_*_s``: paho's reconnect backoff (seconds, doubling
    from min to max); ``max_queued``: messages kept while the broker is unreachable."""

    host: str
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = None
    topic_prefix: str = "rtsed"
    discovery_prefix: str = "homeassistant"
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30
    max_queued: int = 10000
    keepalive_s: int = 30

    @property
    def where(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_mqtt_url(url: str, **options) -> MqttSettings:
    """``mqtt://[user[:password]@]host[:port]`` (``mqtts://`` for TLS, port 8883) -> MqttSettings;
    ValueError naming the problem and the expected form."""
    form = "give it as mqtt://host:port (mqtts:// for TLS; user:password@ before the host if the broker needs it)"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp"):
        raise ValueError(f"--mqtt {url!r}: unknown scheme {parts.scheme!r}; {form}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"--mqtt {url!r}: the port is not a number in 1-65535; {form}") from None
    if not parts.hostname:
        raise ValueError(f"--mqtt {url!r}: no host; {form}")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"--mqtt {url!r}: no path or query is understood (topics: --mqtt-prefix); {form}")
    tls = parts.scheme == "mqtts"
    return MqttSettings(host=parts.hostname, port=port or (8883 if tls else 1883), tls=tls,
                        username=urllib.parse.unquote(parts.username) if parts.username else None,
                        password=urllib.parse.unquote(parts.password) if parts.password else None, **options)


class MqttPublisher(EventOutput):
    """Publishes every stream's onsets, events and on/off states, and announces each stream's
    classes to Home Assistant. ``start()`` returns at once, whether or not the broker is up."""

    def __init__(self, settings: MqttSettings, labels: tuple[str, ...], model_name: str, metrics: ServerMetrics,
                 max_pending: int = 10000):
        self.settings = settings
        self.labels = tuple(labels)
        self.label_slugs = {label: slugify(label, f"class{i}") for i, label in enumerate(labels)}
        self.model_name = model_name
        self.metrics = metrics
        self.prefix = settings.topic_prefix.strip("/")
        self.status_topic = f"{self.prefix}/status"
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._lock = threading.Lock()  # guards _live and _states (publisher thread vs paho's thread)
        self._live: dict[int, StreamRef] = {}
        self._states: dict[tuple[int, str], str] = {}
        self._pending = 0  # handed to paho, not yet acknowledged by the broker
        self._pending_lock = threading.Condition()
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._outage_logged = False
        self._outage_since: float | None = None  # monotonic time the broker became unreachable
        client_id = f"rtsed-{socket.gethostname()}-{os.getpid()}"[:64]
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        if settings.username is not None:
            self.client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            self.client.tls_set()
        self.client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        self.client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
        self.client.max_queued_messages_set(settings.max_queued)
        self.client.connect_timeout = 5.0
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self._thread = threading.Thread(target=self._run, name="rtsed-mqtt-publisher", daemon=True)
        metrics.mqtt_connected.set(0)

    # ------------------------------------------------------------------ topics and payloads
    def stream_topic(self, stream: StreamRef) -> str:
        return f"{self.prefix}/{stream.slug}"

    def label_topic(self, stream: StreamRef, label: str) -> str:
        return f"{self.prefix}/{stream.slug}/{self.label_slugs[label]}"

    def config_topic(self, stream: StreamRef, label: str) -> str:
        return (f"{self.settings.discovery_prefix.strip('/')}/binary_sensor/{self.prefix}_{stream.slug}/"
                f"{self.label_slugs[label]}/config")

    def discovery_config(self, stream: StreamRef, label: str) -> dict:
        """Home Assistant's MQTT discovery payload of the binary_sensor for one stream and class."""
        base = self.label_topic(stream, label)
        return {
            "name": label,
            "unique_id": f"{self.prefix}_{stream.slug}_{self.label_slugs[label]}",
            "state_topic": f"{base}/state",
            "payload_on": ON, "payload_off": OFF,
            "json_attributes_topic": f"{base}/event",
            "availability": [{"topic": self.status_topic}, {"topic": f"{self.stream_topic(stream)}/status"}],
            "availability_mode": "all",
            "payload_available": ONLINE, "payload_not_available": OFFLINE,
            "device_class": "sound",
            "device": {"identifiers": [f"{self.prefix}_{stream.slug}"], "name": f"rtsed {stream.name}",
                       "model": self.model_name, "manufacturer": "rtsed"},
            "origin": {"name": "rtsed"},
        }

    # ------------------------------------------------------------------ EventOutput (worker thread)
    def start(self) -> None:
        self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s)
        self.client.loop_start()
        self._thread.start()

    def stream_started(self, stream: StreamRef) -> None:
        self._put(("started", stream, None))

    def emit(self, stream: StreamRef, item: OnsetNotice | SoundEvent) -> None:
        self._put(("item", stream, item))

    def stream_ended(self, stream: StreamRef) -> None:
        self._put(("ended", stream, None))

    def _put(self, entry) -> None:
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self.metrics.mqtt_messages.labels(result="dropped").inc()

    def close(self, timeout_s: float = 5.0) -> None:
        """Publish what is queued and "offline", wait up to ``timeout_s`` for the broker's
        acknowledgements (not at all while it is unreachable), then disconnect."""
        deadline = time.monotonic() + timeout_s
        self._closing.set()
        self._thread.join(max(0.1, deadline - time.monotonic()))
        self._publish(self.status_topic, OFFLINE, retain=True)
        with self._pending_lock:
            while self._pending and self._connected.is_set() and time.monotonic() < deadline:
                self._pending_lock.wait(0.05)
            unsent = self._pending
        if unsent:
            log.warning("MQTT: %d message(s) not acknowledged by %s at shutdown", unsent, self.settings.where)
        self.client.disconnect()
        self.client.loop_stop()
        self.metrics.mqtt_connected.set(0)

    # ------------------------------------------------------------------ publisher thread
    def _run(self) -> None:
        while True:
            try:
                entry = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._closing.is_set():
                    return  # every stream ended before close(): nothing more will come
                continue
            kind, stream, item = entry
            try:
                if kind == "started":
                    self._announce(stream)
                elif kind == "item":
                    self._publish_item(stream, item)
                else:
                    self._retire(stream)
            except Exception:  # a bug here must not stop later messages
                log.exception("MQTT: publishing %s of stream %s failed", kind, stream.slug)

    def _announce(self, stream: StreamRef) -> None:
        with self._lock:
            self._live[stream.id] = stream
            for label in self.labels:
                self._states[(stream.id, label)] = OFF
        self._publish_stream(stream)

    def _publish_stream(self, stream: StreamRef) -> None:
        """Discovery configs, states and availability of one live stream."""
        for label in self.labels:
            self._publish(self.config_topic(stream, label), json.dumps(self.discovery_config(stream, label)),
                          retain=True)
        for label in self.labels:
            with self._lock:
                state = self._states.get((stream.id, label), OFF)
            self._publish(f"{self.label_topic(stream, label)}/state", state, retain=True)
        self._publish(f"{self.stream_topic(stream)}/status", ONLINE, retain=True)

    def _publish_item(self, stream: StreamRef, item: OnsetNotice | SoundEvent) -> None:
        base = self.label_topic(stream, item.label)
        ended = isinstance(item, SoundEvent)
        self._publish(f"{base}/{'event' if ended else 'onset'}", json.dumps(item_payload(stream, item)))
        with self._lock:
            self._states[(stream.id, item.label)] = OFF if ended else ON
        self._publish(f"{base}/state", OFF if ended else ON, retain=True)

    def _retire(self, stream: StreamRef) -> None:
        with self._lock:
            self._live.pop(stream.id, None)
            for label in self.labels:
                self._states.pop((stream.id, label), None)
        # Every open event was closed (and its OFF published) before the stream ended.
        self._publish(f"{self.stream_topic(stream)}/status", OFFLINE, retain=True)

    def _publish(self, topic: str, payload: str, retain: bool = False) -> None:
        # Counted before the call: the broker's acknowledgement (on paho's thread) may come
        # before publish() returns. No lock of ours is held across publish(): paho calls
        # on_publish under its own message lock, which publish() takes too.
        with self._pending_lock:
            self._pending += 1
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:  # paho's queue is full: the broker has been away long
            self.metrics.mqtt_messages.labels(result="dropped").inc()
            with self._pending_lock:
                self._pending -= 1

    # ------------------------------------------------------------------ paho's network thread
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._outage_since = self._outage_since or time.monotonic()
            if not self._outage_logged:
                self._outage_logged = True
                log.error("MQTT: the broker at %s refused the connection (%s); check the user and password in "
                          "--mqtt; retrying every %d s at most", self.settings.where, reason_code,
                          self.settings.reconnect_max_s)
            return
        self._connected.set()
        self.metrics.mqtt_connected.set(1)
        if self._outage_since is not None:
            log.warning("MQTT: connected to %s after %.1f s unreachable; sending what was queued",
                        self.settings.where, time.monotonic() - self._outage_since)
        else:
            log.info("MQTT: connected to %s", self.settings.where)
        self._outage_logged = False
        self._outage_since = None
        # A broker restarted without persistence has lost the retained messages: say them again.
        self._publish(self.status_topic, ONLINE, retain=True)
        with self._lock:
            live = list(self._live.values())
        for stream in live:
            self._publish_stream(stream)

    def _on_connect_fail(self, client, userdata) -> None:
        self._outage_since = self._outage_since or time.monotonic()
        if not self._outage_logged:
            self._outage_logged = True
            log.warning("MQTT: cannot reach the broker at %s; retrying with backoff (%d s doubling to %d s); "
                        "up to %d messages are kept meanwhile, detection goes on", self.settings.where,
                        self.settings.reconnect_min_s, self.settings.reconnect_max_s, self.settings.max_queued)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self.metrics.mqtt_connected.set(0)
        if was_connected and reason_code != 0:  # 0: our own disconnect() at shutdown
            self._outage_logged = True
            self._outage_since = time.monotonic()
            log.warning("MQTT: lost the broker at %s (%s); reconnecting with backoff (%d s doubling to %d s), "
                        "messages are kept meanwhile", self.settings.where, reason_code,
                        self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        with self._pending_lock:
            self._pending_lock.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.metrics.mqtt_messages.labels(result="published").inc()
        with self._pending_lock:
            self._pending -= 1
            self._pending_lock.notify_all()
