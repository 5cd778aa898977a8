"""The gateway: ``rtsed.serve --nats URL`` takes streams in as always (WebSockets, pulled URLs)
but runs no model. Each stream's audio, decoded, downmixed and resampled to the model's rate as
the local server does it, is cut into blocks and published to NATS (rtsed.cluster.subjects); the
events that the partition's worker publishes back are relayed to the stream's client and to the
event outputs (MQTT, webhook) exactly as local detections are.

The relay takes the place of the server's batching worker (same interface: streams join with
``add`` and leave through their session's ``request_end``) and runs on a thread of its own with
its own asyncio loop for the NATS client; the server's event loop still only moves bytes.

A worker that takes a partition over decides again the events since its resume point: the relay
passes each (kind, label, onset frame) of a stream once. A stream ends when its worker says so,
after its last events (or once no worker has answered nor reported progress, which workers send
with every resume point, for ``end_timeout_s``: said in the close reason).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from rtsed.cluster.subjects import (AudioBlock, audio_in_subject, check_token, encode_block, ensure_audio_stream,
                                    stream_of)
from rtsed.config import DetectorConfig
from rtsed.serve.decode import OnsetNotice, SoundEvent
from rtsed.serve.outputs import EventOutput, StreamRef, slugify
from rtsed.serve.protocol import CLOSE_NORMAL
from rtsed.serve.session import SessionLimits, StreamSession
from rtsed.serve.telemetry import ServerMetrics
from rtsed.serve.worker import BatchWorker, _idle_reason

log = logging.getLogger("rtsed.serve")

DEFAULT_RETENTION_S = 10.0  # the audio stream's retention when the gateway is first to create it
SEEN_PER_STREAM = 512  # (kind, label, onset frame) kept per stream to drop a takeover's repeats


@dataclass(frozen=True)
class NatsSettings:
    """``--nats`` and its options."""

    url: str
    gateway_id: str = field(default_factory=lambda: secrets.token_hex(3))
    block_s: float = 0.04  # audio per message
    sample_format: str = "f32le"  # or s16le: half the bytes, 16-bit resolution
    end_timeout_s: float = 30.0  # how long an ended stream waits for its worker's last events


@dataclass
class RelayedStream:
    """What the relay keeps per stream: its name on NATS, its unsent audio, what came back."""

    key: str  # <gateway>.<n>
    seq: int = 0
    next_sample: int = 0
    pending: list[np.ndarray] = field(default_factory=list)
    pending_samples: int = 0
    end_published_at: float | None = None
    last_progress_at: float = 0.0  # when the worker last said how far it has decoded
    decoded_s: float = 0.0  # how far, in stream time
    seen: deque = field(default_factory=lambda: deque(maxlen=SEEN_PER_STREAM))
    workers: list[str] = field(default_factory=list)


class GatewayRelay(BatchWorker):
    """Stands in for ``BatchWorker`` in a gateway: audio out to NATS, events back from it."""

    def __init__(self, settings: NatsSettings, config: DetectorConfig, metrics: ServerMetrics,
                 max_streams: int = 64, outputs: list[EventOutput] | None = None, limits: SessionLimits | None = None):
        super().__init__(None, config, metrics, max_streams, 1, 1, outputs, limits)
        self.name = "rtsed-serve-nats-relay"
        check_token(settings.gateway_id, "--nats-gateway-id")
        if settings.sample_format not in ("f32le", "s16le"):
            raise ValueError(f"--nats-format {settings.sample_format!r}: use f32le or s16le")
        self.settings = settings
        self.end_grace_s = settings.end_timeout_s
        self.rate_hz = config.frontend.sample_rate_hz
        self.hop_s = config.frontend.hop_s
        self.block_samples = max(1, round(settings.block_s * self.rate_hz))
        self.relayed: dict[int, RelayedStream] = {}  # session id ->
        self.by_key: dict[str, StreamSession] = {}
        self.connected = False

    # ------------------------------------------------------------------ the thread
    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # every stream is told, as the local worker does
            self._fail_every_stream(exc, "rtsed.serve NATS relay failed")
        finally:
            self._stopped.set()

    async def _main(self) -> None:
        import nats

        async def disconnected():
            self.connected = False
            log.warning("NATS connection lost; reconnecting (audio meanwhile is buffered by the client library)")

        async def reconnected():
            self.connected = True
            log.info("NATS connection back")

        self.nc = await nats.connect(self.settings.url, name=f"rtsed-gateway-{self.settings.gateway_id}",
                                     max_reconnect_attempts=-1, connect_timeout=5,
                                     disconnected_cb=disconnected, reconnected_cb=reconnected)
        self.connected = True
        await ensure_audio_stream(self.nc.jetstream(), DEFAULT_RETENTION_S)
        await self.nc.subscribe(f"rtsed.events.{self.settings.gateway_id}.*", cb=self._on_event)
        log.info("gateway %s publishing audio to %s", self.settings.gateway_id, self.settings.url)
        try:
            while True:
                if not self.wake.is_set():
                    await asyncio.sleep(0.005)  # the server's threads set wake; a short poll keeps latency low
                self.wake.clear()
                await self._relay_round()
                with self._lock:
                    if self._stopping and not self.sessions:
                        break
        finally:
            try:  # what is still buffered goes out; a server that is gone does not hold the shutdown up
                await asyncio.wait_for(self.nc.drain(), 5.0)
            except Exception:
                await self.nc.close()

    async def _relay_round(self) -> None:
        with self._lock:
            joining, self._joining = self._joining, []
            sessions = list(self.sessions.values())
        for s in joining:
            self._place(s)
        now = time.monotonic()
        queued = 0.0
        for s in sessions:
            r = self.relayed.get(s.id)
            if r is None:
                continue
            if r.end_published_at is not None:
                # A worker behind real time still reports progress: the wait counts from its last word.
                if now - max(r.end_published_at, r.last_progress_at) > self.settings.end_timeout_s:
                    s.end_reason += (f"; no worker confirmed the end nor made progress for "
                                     f"{self.settings.end_timeout_s:g} s (is a worker running for every partition?)")
                    self._finish(s)
                continue
            idle_s = self.limits.idle_timeout_s
            if s.end_code is None and now - s.last_audio_wall >= idle_s and not s.has_audio():
                s.request_end(CLOSE_NORMAL, _idle_reason(idle_s))
            if s.end_code is not None:
                await self._publish(s, r, s.flush_audio(), end=True)
                r.end_published_at = now
            else:
                await self._publish(s, r, s.take_audio(), end=False)
            queued += s.queued_s + r.pending_samples / self.rate_hz

        self.metrics.queued_audio.set(queued)

    def _place(self, s: StreamSession) -> None:
        key = f"{self.settings.gateway_id}.{s.id}"
        self.relayed[s.id] = RelayedStream(key)
        self.by_key[key] = s
        s.slot = (0, s.id)  # shown as live in /streams
        slug = slugify(s.header.name, f"stream{s.id}")
        if slug in self._slugs:
            slug = f"{slug}-{s.id}"
        self._slugs.add(slug)
        s.ref = StreamRef(s.id, slug, s.name)
        s.details["nats_stream"] = key
        self._tell("stream_started", s.ref)

    async def _publish(self, s: StreamSession, r: RelayedStream, audio: np.ndarray, end: bool) -> None:
        """Whole blocks of the stream's audio out; at its end, the rest with the end mark."""
        if audio.size:
            s.model_samples += audio.shape[0]
            r.pending.append(audio)
            r.pending_samples += audio.shape[0]
        if r.pending_samples < self.block_samples and not end:
            return
        samples = np.concatenate(r.pending) if len(r.pending) > 1 else (r.pending[0] if r.pending else
                                                                         np.zeros(0, np.float32))
        n_whole = samples.shape[0] // self.block_samples * self.block_samples
        cut = samples.shape[0] if end else n_whole
        blocks = [samples[i:i + self.block_samples] for i in range(0, cut, self.block_samples)] or [samples[:0]]
        rest = samples[cut:]
        r.pending = [rest] if rest.size else []
        r.pending_samples = rest.shape[0]
        thresholds = ({label: list(v) if isinstance(v, tuple) else v for label, v in s.header.thresholds.items()}
                      if s.header.thresholds else None)
        for i, block in enumerate(blocks):
            last = end and i == len(blocks) - 1
            payload, headers = encode_block(AudioBlock(r.key, r.seq, r.next_sample, self.rate_hz, block, s.name,
                                                       thresholds, last), self.settings.sample_format)
            await self.nc.publish(audio_in_subject(r.key), payload, headers=headers)
            r.seq += 1
            r.next_sample += block.shape[0]

    # ------------------------------------------------------------------ events back
    async def _on_event(self, msg) -> None:
        s = self.by_key.get(stream_of(msg.subject))
        if s is None:
            return  # a stream already closed (a takeover's repeat of its end), or another gateway's
        r = self.relayed[s.id]
        try:
            data = json.loads(msg.data)
            kind = data["type"]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable message on %s: %r", msg.subject, msg.data[:200])
            return
        worker = data.get("worker")
        if worker and (not r.workers or r.workers[-1] != worker):
            r.workers.append(worker)
            s.details["workers"] = list(r.workers)
        if kind in ("onset", "event"):
            seen = (kind, data["label"], round(data["onset_s"] / self.hop_s))
            if seen in r.seen:
                return
            r.seen.append(seen)
            if kind == "event":
                item = SoundEvent(data["label"], data["onset_s"], data["offset_s"], data["score"])
                self.metrics.events.inc()
            else:
                item = OnsetNotice(data["label"], data["onset_s"], data.get("score", 0.0))
            s.emit([item])
            self._tell("emit", s.ref, item)
        elif kind == "progress":
            r.last_progress_at = time.monotonic()
            r.decoded_s = data.get("t_s", r.decoded_s)
            s.details["decoded_s"] = r.decoded_s
        elif kind == "end":
            if r.end_published_at is not None:
                self._finish(s)
        elif kind == "error":
            s.send({"type": "warning", "message": data.get("message", "")})

    def _finish(self, s: StreamSession) -> None:
        r = self.relayed.pop(s.id, None)
        if r is None:
            return
        self.by_key.pop(r.key, None)
        self._release(s)
        # Which workers ran the stream, in order (more than one: a takeover), for GET /streams.
        for closed in self.closed_recently:
            if closed["id"] == s.id:
                closed["workers"] = list(r.workers)
                break
