"""The batching worker: one thread that turns every stream's queued audio into events.

Streams sit in slots of ``MultiStreamEngine`` shards of ``batch_streams`` slots each (a shard
is one batched model call; more shards open as streams join, up to ``max_streams`` in all, so
a few streams do not pay for a large batch). Each round the worker takes every stream's queued
audio (decode, downmix, resample: rtsed.serve.session), steps each shard while some of its
streams has a step's frames (streams without audio sit the step out: one stalled client holds
no one back), and sends events and display frames back. It never runs on the event loop, and
the event loop never runs the model.

A stream ends (``StreamSession.request_end``: the client's end message, a disconnect, a bad
client, the idle timeout, shutdown) by completing in its engine: queued audio, the lookahead's
padding, the decoder's flush; its last events go out before its socket closes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

import numpy as np

from rtsed.config import DetectorConfig
from rtsed.serve.outputs import EventOutput, StreamRef, slugify
from rtsed.serve.protocol import CLOSE_INTERNAL, CLOSE_NORMAL
from rtsed.serve.session import SessionLimits, StreamSession
from rtsed.serve.telemetry import ServerMetrics

if TYPE_CHECKING:  # the engine (and torch, through its front end) loads when a shard is made:
    from rtsed.serve.engine import MultiStreamEngine  # a gateway's relay never makes one
    from rtsed.serve.steppers import Stepper

log = logging.getLogger("rtsed.serve")

# Steps per shard before the worker looks at joins, ends and new audio again: a stream with a
# long backlog does not keep new streams waiting.
STEPS_PER_ROUND = 32


class ServerFull(Exception):
    """No free slot: ``max_streams`` streams are connected."""


class BatchWorker(threading.Thread):
    """Owns the engines; sessions join with ``add`` (any thread) and leave through their
    ``request_end``. ``stop()`` ends every stream (events closed and sent) and the thread."""

    # How much longer than the server's own timeouts a stream may take to complete once it is
    # ending: none here (the engines are in this process); a relay to remote workers waits for them.
    end_grace_s = 0.0

    def __init__(self, make_stepper: Callable[[int], Stepper], config: DetectorConfig, metrics: ServerMetrics,
                 max_streams: int = 64, batch_streams: int = 16, frames_per_step: int = 4,
                 outputs: list[EventOutput] | None = None, limits: SessionLimits | None = None):
        super().__init__(name="rtsed-serve-worker", daemon=True)
        if max_streams < 1 or batch_streams < 1:
            raise ValueError("--max-streams and --batch-streams must be >= 1")
        self.make_stepper = make_stepper
        self.config = config
        self.metrics = metrics
        self.max_streams = max_streams
        self.batch_streams = min(batch_streams, max_streams)
        self.frames_per_step = frames_per_step
        # Told of every stream's start, onsets, events and end, on this thread (they only queue).
        self.outputs = list(outputs or [])
        self._slugs: set[str] = set()  # slugs of the streams in the engines (unique among them)
        # The engines enforce the streams' idle timeout and bound their queues of frames (drop
        # oldest, counted): the inboxes are drained every round, so a worker that falls behind
        # builds its backlog there.
        self.limits = limits or SessionLimits()
        self.shards: list[MultiStreamEngine] = []
        self.owner: list[list[StreamSession | None]] = []  # [shard][slot] -> session
        self._lock = threading.Lock()
        self.sessions: dict[int, StreamSession] = {}  # every connected stream, by id
        self._joining: list[StreamSession] = []
        self.wake = threading.Event()
        self._stopping = False
        self._stopped = threading.Event()
        self.error: BaseException | None = None
        self.closed_recently: deque[dict] = deque(maxlen=20)
        self.started_at = time.monotonic()
        self._steps_window: deque[tuple[float, int]] = deque(maxlen=256)
        self.steps_done = 0
        self._display_skipped_seen = 0
        norm = config.normalization
        # Display scale of the log-mel: the training statistics' span, 0-255.
        mean = float(np.mean(norm.mean)) if norm else 0.0
        std = float(np.mean(norm.std)) if norm else 1.0
        self.mel_offset, self.mel_scale = mean - 3 * std, 255.0 / (6 * std)

    # ------------------------------------------------------------------ any thread
    def add(self, session: StreamSession) -> None:
        with self._lock:
            if self._stopping:
                raise ServerFull("the server is shutting down")
            if len(self.sessions) >= self.max_streams:
                raise ServerFull(f"the server is full: {self.max_streams} streams (--max-streams)")
            session.mel_offset, session.mel_scale = self.mel_offset, self.mel_scale
            self.sessions[session.id] = session
            self._joining.append(session)
        self.metrics.streams.set(len(self.sessions))
        self.wake.set()

    def stop(self, reason: str, code: int, timeout_s: float = 10.0) -> bool:
        """End every stream with ``code``/``reason`` (their events closed and sent), refuse new
        ones, and stop the thread; returns whether that finished within ``timeout_s``."""
        with self._lock:
            self._stopping = True
            sessions = list(self.sessions.values())
        for s in sessions:
            s.request_end(code, reason)
        self.wake.set()
        return self._stopped.wait(timeout_s)

    def snapshot(self) -> list[dict]:
        with self._lock:
            sessions = list(self.sessions.values())
        return [s.describe(self.config.labels) for s in sessions]

    def steps_per_s(self) -> float:
        """Model steps per second over the last few seconds."""
        window = [(t, n) for t, n in self._steps_window if t > time.monotonic() - 5.0]
        if len(window) < 2:
            return 0.0
        return (window[-1][1] - window[0][1]) / max(1e-6, window[-1][0] - window[0][0])

    # ------------------------------------------------------------------ the thread
    def run(self) -> None:
        try:
            while True:
                self.wake.wait(timeout=0.05)
                self.wake.clear()
                self._round()
                with self._lock:
                    if self._stopping and not self.sessions:
                        break
        except BaseException as exc:  # the worker must not die silently: every stream is told
            self._fail_every_stream(exc, "rtsed.serve worker failed")
        finally:
            self._stopped.set()

    def _fail_every_stream(self, exc: BaseException, what: str) -> None:
        """The thread is dying of ``exc``: log it, keep it in ``error`` (GET /health says so) and
        close every stream with a server error, so that no client waits for events that never come."""
        log.exception("%s", what)
        self.error = exc
        with self._lock:
            sessions = list(self.sessions.values())
            self.sessions.clear()
        for s in sessions:
            s.request_end(CLOSE_INTERNAL, f"server error: {type(exc).__name__}: {exc}")
            s.finish()

    def _round(self) -> None:
        with self._lock:
            joining, self._joining = self._joining, []
            sessions = list(self.sessions.values())
        for s in joining:
            # Placed even when already ending: a fast client may send its audio and its end
            # before the worker's next round, and that audio is still the stream's.
            self._place(s)
        idle = [engine.idle_slots() for engine in self.shards]
        queued = 0.0
        hop_s = self.config.frontend.hop_s
        dropped_before = sum(engine.stats.dropped_frames for engine in self.shards)
        for s in sessions:
            if s.slot is None:
                continue
            shard, slot = s.slot
            engine = self.shards[shard]
            if not engine.active[slot] or engine.ending[slot]:
                continue
            if s.end_code is None and idle[shard][slot] and not s.has_audio():
                s.request_end(CLOSE_NORMAL, _idle_reason(engine.idle_timeout_s))
            if s.end_code is not None:
                self._push(s, engine, slot, s.flush_audio())
                engine.end(slot)
            else:
                self._push(s, engine, slot, s.take_audio())
            queued += s.queued_s + engine.queued[slot] * hop_s
        self.metrics.queued_audio.set(queued)
        dropped = sum(engine.stats.dropped_frames for engine in self.shards) - dropped_before
        if dropped:
            self.metrics.queue_dropped_audio.inc(dropped * hop_s)
        for _ in range(STEPS_PER_ROUND):
            stepped = False
            for shard, engine in enumerate(self.shards):
                if engine.ready():
                    self._step(shard, engine)
                    stepped = True
            if not stepped:
                break
        skipped = sum(s.display_skipped for s in sessions)
        if skipped > self._display_skipped_seen:
            self.metrics.display_skipped.inc(skipped - self._display_skipped_seen)
        self._display_skipped_seen = skipped

    def _place(self, s: StreamSession) -> None:
        for shard, engine in enumerate(self.shards):
            free = np.flatnonzero(~engine.active & np.array([o is None for o in self.owner[shard]]))
            if free.size:
                self._start(s, shard, int(free[0]))
                return
        # A new shard: a batch of its own (max_streams bounds the total through ``add``).
        from rtsed.serve.engine import MultiStreamEngine

        engine = MultiStreamEngine(self.make_stepper(self.batch_streams), self.config, self.frames_per_step,
                                   idle_timeout_s=self.limits.idle_timeout_s, max_queue_s=self.limits.max_queue_s)
        self.shards.append(engine)
        self.owner.append([None] * self.batch_streams)
        self._start(s, len(self.shards) - 1, 0)

    def _start(self, s: StreamSession, shard: int, slot: int) -> None:
        # A pulled stream (infinite idle timeout) may be silent while its source reconnects.
        self.shards[shard].start(slot, s.header.thresholds or None, never_idle=math.isinf(s.limits.idle_timeout_s))
        self.owner[shard][slot] = s
        s.slot = (shard, slot)
        slug = slugify(s.header.name, f"stream{s.id}")
        if slug in self._slugs:
            slug = f"{slug}-{s.id}"
        self._slugs.add(slug)
        s.ref = StreamRef(s.id, slug, s.name)
        self._tell("stream_started", s.ref)

    def _push(self, s: StreamSession, engine: MultiStreamEngine, slot: int, audio: np.ndarray) -> None:
        if audio.size:
            s.model_samples += audio.shape[0]
            mel = engine.push_audio(slot, audio)
            if mel.shape[0]:
                s.add_frames(mel=mel)

    def _step(self, shard: int, engine: MultiStreamEngine) -> None:
        run = engine.runnable()
        started = time.perf_counter()
        result = engine.step()
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self.metrics.steps.inc()
        self.metrics.stepped_streams.inc(int(run.sum()))
        self.metrics.held_streams.inc(int((engine.active & ~run).sum()))
        self.steps_done += 1
        self._steps_window.append((time.monotonic(), self.steps_done))
        for slot in np.flatnonzero(run):
            s = self.owner[shard][slot]
            if s is None:
                continue
            rows = engine.last_rows.get(int(slot))
            if rows is not None:
                s.add_frames(probs=rows)
            items = result.get(int(slot), [])
            if items:
                s.emit(items)
                self.metrics.events.inc(sum(1 for i in items if hasattr(i, "offset_s")))
                for item in items:
                    self._tell("emit", s.ref, item)
            if not engine.active[slot]:
                if engine.timed_out[slot]:  # crossed the timeout between the round's check and this step
                    s.request_end(CLOSE_NORMAL, _idle_reason(engine.idle_timeout_s))
                self.owner[shard][slot] = None
                self._release(s)

    def _tell(self, method: str, *args) -> None:
        """Call ``method`` on every output; an output's bug is logged, never the worker's end."""
        for output in self.outputs:
            try:
                getattr(output, method)(*args)
            except Exception:
                log.exception("event output %s.%s failed", type(output).__name__, method)

    def _release(self, s: StreamSession) -> None:
        s.finish()
        self._tell("stream_ended", s.ref)
        self._slugs.discard(s.ref.slug)
        self.metrics.dropped_audio.inc(s.dropped_s)
        self.metrics.closed.labels(reason=_reason_kind(s.end_code, s.end_reason)).inc()
        with self._lock:
            self.sessions.pop(s.id, None)
            n = len(self.sessions)
        self.metrics.streams.set(n)
        self.closed_recently.appendleft({"id": s.id, "name": s.name, "code": s.end_code, "reason": s.end_reason,
                                         "audio_s": round(s.model_samples / s.model_rate_hz, 2),
                                         "events": s.events, "dropped_audio_s": round(s.dropped_s, 3),
                                         **({"url": s.details["url"]} if "url" in s.details else {})})
        log.info("stream %d (%s) closed: %s %s", s.id, s.name, s.end_code, s.end_reason)


def _idle_reason(timeout_s: float) -> str:
    return (f"no audio for {timeout_s:g} s: stream ended "
            "(send audio continuously, or {\"type\": \"end\"} when done)")


def _reason_kind(code: int | None, reason: str) -> str:
    """A short label for the closes counter (bounded cardinality)."""
    for word in ("flood", "not reading", "no audio", "shutting down", "client ended", "disconnected",
                 "server error"):
        if word in reason:
            return word.replace(" ", "_")
    return str(code)
