"""One client stream on the server: its bounded audio inbox, the conversion to the model's
samples, its display frames and its way back to the client.

Two threads touch a session, each through its own half:

- the event loop (``offer``, ``request_end``): takes binary messages, checks the pace against
  real time, queues the bytes; never decodes, resamples or steps anything;
- the batching worker (``take_audio``, ``add_frames``, ``emit``, ``finish``): decodes, downmixes
  and resamples to the model's rate (soxr, as ``rtsed.detect`` reads files), and sends messages
  back through the event loop (``loop.call_soon_threadsafe``).

Memory is bounded per stream: the inbox holds at most ``max_queue_s`` of audio (beyond it new
audio is dropped and counted: the server is behind), a client may run at most ``max_ahead_s``
ahead of real time (beyond it the stream is a flood and is closed), and display messages are
skipped while the client has more than ``display_backlog`` messages unsent.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from rtsed.audio.sources import Sanitizer, StreamingResampler, level_dbfs
from rtsed.serve.decode import OnsetNotice, SoundEvent, event_to_json
from rtsed.serve.outputs import StreamRef
from rtsed.serve.protocol import CLOSE_POLICY, ProtocolError, SampleDecoder, StreamHeader, dumps

_ids = itertools.count(1)


@dataclass(frozen=True)
class SessionLimits:
    """Per-stream bounds (seconds of audio or wall clock)."""

    max_ahead_s: float = 10.0  # audio received beyond real time since the first audio -> flood
    max_queue_s: float = 15.0  # audio waiting for the worker -> newer audio dropped
    idle_timeout_s: float = 10.0  # no audio for this long -> the stream is ended
    display_interval_s: float = 0.1  # stream time between display messages
    display_backlog: int = 64  # unsent messages above which display messages are skipped


@dataclass(frozen=True)
class Close:
    """The last item of a session's outbox: close the socket with this code and reason."""

    code: int
    reason: str


class Watcher:
    """One onlooker of a stream (``GET /watch/{id}``): a queue of the stream's JSON messages on
    the event loop. Display frames are skipped while ``backlog`` messages wait unsent (a slow
    viewer sees fewer frames, never fewer events, and holds no memory beyond that)."""

    def __init__(self, backlog: int):
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.backlog = backlog
        self.skipped = 0

    def offer(self, text: str) -> None:
        if self.queue.qsize() > self.backlog and text.startswith('{"type":"frames"'):
            self.skipped += 1
            return
        self.queue.put_nowait(text)


class StreamSession:
    """A stream from its header to its close. ``outbox`` is an asyncio.Queue on ``loop`` that the
    connection's sender drains: JSON strings, then one ``Close``."""

    def __init__(self, header: StreamHeader, model_rate_hz: int, hop_s: float, limits: SessionLimits,
                 loop: asyncio.AbstractEventLoop, client: str = ""):
        self.id = next(_ids)
        self.header = header
        self.name = header.name or f"stream {self.id}"
        self.client = client
        self.limits = limits
        self.loop = loop
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.created = time.monotonic()
        self.hop_s = hop_s
        # -- event-loop half (guarded by _lock where the worker reads it)
        self._lock = threading.Lock()
        self._inbox: deque[bytes] = deque()
        self.queued_bytes = 0
        self.received_bytes = 0
        self.dropped_bytes = 0
        self.first_audio_wall: float | None = None
        self.last_audio_wall = self.created
        self.end_code: int | None = None  # set once: why the stream ends (None: running)
        self.end_reason = ""
        self.client_gone = False
        # -- worker half
        self.slot: tuple[int, int] | None = None  # (shard, slot) in the worker's engines
        self.ref: StreamRef | None = None  # the stream as event outputs name it (set when placed)
        self.details: dict = {}  # where a pulled stream comes from (url, connected, reconnects), for /streams
        self._samples = SampleDecoder(header)
        self._sanitizer = Sanitizer()
        self._resampler = StreamingResampler(header.sample_rate_hz, model_rate_hz)
        self.model_samples = 0  # samples at the model's rate handed to the engine
        self.model_rate_hz = model_rate_hz
        self.level_dbfs = -120.0
        self.events = 0
        self.last_event: dict | None = None
        self.display_skipped = 0
        self.probs_frames = 0  # valid output frames so far (frame t covers [t*hop, (t+1)*hop))
        self.mel_frames = 0
        self._probs: list[np.ndarray] = []
        self._mel: list[np.ndarray] = []
        self._level_sq = 0.0
        self._level_n = 0
        self.latest_probs: np.ndarray | None = None
        self.finished = threading.Event()
        # -- read-only onlookers (the page's view of a stream, /watch/{id}): event-loop side
        self.watchers: set[Watcher] = set()
        self.on_finished: list = []  # callables run on the event loop once the stream has finished

    # ------------------------------------------------------------------ event-loop half
    def offer(self, data: bytes, now: float | None = None) -> None:
        """Queue one binary message. Raises ProtocolError when the client runs more than
        ``max_ahead_s`` ahead of real time; drops (and counts) audio past ``max_queue_s``."""
        now = time.monotonic() if now is None else now
        if self.first_audio_wall is None:
            self.first_audio_wall = now
        self.received_bytes += len(data)
        self.last_audio_wall = now
        bps = self.header.bytes_per_second
        ahead = self.received_bytes / bps - (now - self.first_audio_wall)
        if ahead > self.limits.max_ahead_s:
            raise ProtocolError(
                CLOSE_POLICY,
                f"flood: audio arrives {ahead:.1f} s ahead of real time (limit {self.limits.max_ahead_s:g} s); "
                "send audio at its real-time rate, or raise the server's --max-ahead-s")
        with self._lock:
            if self.queued_bytes + len(data) > self.limits.max_queue_s * bps:
                self.dropped_bytes += len(data)
                return
            self._inbox.append(data)
            self.queued_bytes += len(data)

    def request_end(self, code: int, reason: str) -> bool:
        """Ask for the stream to end (its open events closed and sent, then the socket closed
        with ``code``). The first request wins; returns whether this one did."""
        with self._lock:
            if self.end_code is not None:
                return False
            self.end_code, self.end_reason = code, reason
            return True

    def has_audio(self) -> bool:
        """Whether audio waits in the inbox (received, not yet taken by the worker)."""
        with self._lock:
            return bool(self._inbox)

    @property
    def queued_s(self) -> float:
        return self.queued_bytes / self.header.bytes_per_second

    @property
    def dropped_s(self) -> float:
        return self.dropped_bytes / self.header.bytes_per_second

    # ------------------------------------------------------------------ worker half
    def take_audio(self) -> np.ndarray:
        """The queued messages as mono float32 samples (m,) at the model's rate (m may be 0)."""
        with self._lock:
            chunks = list(self._inbox)
            self._inbox.clear()
            self.queued_bytes = 0
        if not chunks:
            return np.zeros(0, np.float32)
        frames = self._samples.decode(b"".join(chunks))  # (n, channels)
        return self._to_model_rate(frames)

    def flush_audio(self) -> np.ndarray:
        """End of stream: the queued audio and what the resampler still holds, (m,) float32."""
        out = self.take_audio()
        tail = self._resampler.flush()
        return np.concatenate([out, tail]) if tail.size else out

    def _to_model_rate(self, frames: np.ndarray) -> np.ndarray:
        if frames.shape[0] == 0:
            return np.zeros(0, np.float32)
        self._sanitizer(frames)
        mono = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]
        x64 = mono.astype(np.float64)
        self._level_sq += float(np.dot(x64, x64))
        self._level_n += mono.shape[0]
        return self._resampler.process(mono)

    def add_frames(self, mel: np.ndarray | None = None, probs: np.ndarray | None = None) -> None:
        """Collect display rows: raw log-mel frames (n, F) and valid output frames' probabilities
        (m, C); a ``frames`` message goes out once they span ``display_interval_s``."""
        if mel is not None and mel.shape[0]:
            self._mel.append(mel)
        if probs is not None and probs.shape[0]:
            self._probs.append(probs)
            self.latest_probs = probs[-1]
        span = sum(m.shape[0] for m in self._mel) * self.hop_s
        if span >= self.limits.display_interval_s - 1e-9:
            self.send_display()

    def send_display(self) -> None:
        mel = np.concatenate(self._mel) if self._mel else np.zeros((0, 0), np.float32)
        probs = np.concatenate(self._probs) if self._probs else np.zeros((0, 0), np.float32)
        self._mel, self._probs = [], []
        if self._level_n:
            self.level_dbfs = level_dbfs(np.array([np.sqrt(self._level_sq / self._level_n)]))[0]
            self._level_sq, self._level_n = 0.0, 0
        message = {
            "type": "frames",
            "t_s": round(self.probs_frames * self.hop_s, 6),
            "probs": np.round(probs, 3).tolist(),
            "mel_t_s": round(self.mel_frames * self.hop_s, 6),
            "mel": self._quantise(mel),
            "level_dbfs": round(self.level_dbfs, 1),
        }
        self.probs_frames += probs.shape[0]
        self.mel_frames += mel.shape[0]
        if self.outbox.qsize() > self.limits.display_backlog:
            self.display_skipped += 1  # a slow reader gets fewer display frames, never fewer events
            return
        self.send(message)

    mel_offset = 0.0  # log-mel value drawn as 0 and per-unit scale to 0-255 (set by the worker)
    mel_scale = 1.0

    def _quantise(self, mel: np.ndarray) -> list:
        if mel.size == 0:
            return []
        q = np.clip((mel - self.mel_offset) * self.mel_scale, 0, 255)
        return np.rint(q).astype(np.uint8).tolist()

    def emit(self, items: list[OnsetNotice | SoundEvent]) -> None:
        for item in items:
            message = event_to_json(item)
            if isinstance(item, SoundEvent):
                self.events += 1
                self.last_event = message
            self.send(message)

    def send(self, message: dict | str) -> None:
        """Queue a message for the client and the watchers (any thread); a client that is gone
        gets nothing."""
        if self.client_gone and not self.watchers:
            return
        text = message if isinstance(message, str) else dumps(message)
        self.loop.call_soon_threadsafe(self._deliver, text)

    def _deliver(self, text: str) -> None:
        """On the event loop: the message into the client's outbox and every watcher's."""
        if not self.client_gone:
            self.outbox.put_nowait(text)
        for watcher in list(self.watchers):
            watcher.offer(text)

    def watch(self, backlog: int | None = None) -> Watcher:
        """A new watcher of this stream's messages (on the event loop): from now on it gets
        what the client gets (display frames skipped while it has ``backlog`` unsent), up to
        the ``end`` message."""
        watcher = Watcher(self.limits.display_backlog if backlog is None else backlog)
        self.watchers.add(watcher)
        return watcher

    def finish(self) -> None:
        """The stream is complete: last display frames, the ``end`` message, then the close."""
        if self._mel or self._probs:
            self.send_display()
        code, reason = self.end_code, self.end_reason
        self.send({"type": "end", "reason": reason, "audio_s": round(self.model_samples / self.model_rate_hz, 3),
                   "events": self.events, "dropped_audio_s": round(self.dropped_s, 3)})
        if not self.client_gone:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, Close(code, reason))
        self.finished.set()
        for callback in self.on_finished:
            self.loop.call_soon_threadsafe(callback)

    # ------------------------------------------------------------------ for /streams
    def describe(self, labels: tuple[str, ...]) -> dict:
        top = []
        if self.latest_probs is not None:
            order = np.argsort(-self.latest_probs)[:3]
            top = [[labels[i], round(float(self.latest_probs[i]), 3)] for i in order]
        now = time.monotonic()
        return {
            "id": self.id, "name": self.name, "slug": self.ref.slug if self.ref else None, "client": self.client,
            "sample_rate": self.header.sample_rate_hz, "channels": self.header.channels,
            "format": self.header.sample_format,
            "state": "ending" if self.end_code is not None else ("live" if self.slot is not None else "joining"),
            "age_s": round(now - self.created, 1),
            "audio_s": round(self.model_samples / self.model_rate_hz, 2),
            "queued_s": round(self.queued_s, 3), "dropped_audio_s": round(self.dropped_s, 3),
            "silent_for_s": round(now - self.last_audio_wall, 1),
            "level_dbfs": round(self.level_dbfs, 1), "events": self.events, "last_event": self.last_event,
            "top": top, "display_skipped": self.display_skipped, **self.details,
        }
