"""Streams the server pulls itself: a URL (``--input URL``, ``POST /streams {"url": ...}``) read
by a reconnecting ``UrlSource`` (rtsed.audio.network) and fed to the batching worker like a
WebSocket client's audio.

Each pulled stream is a ``StreamSession`` with no client: its events go to the event outputs
(MQTT, webhook) and to ``GET /streams``, nothing is queued for a socket. A thread per stream
moves the source's blocks (already mono at the model's rate) into the session. A source may
run faster than real time (a file over HTTP): the thread waits while the worker has more than
``max_queued_s`` of it queued, so nothing is dropped and nothing floods. The stream ends when
asked (``stop()``: ``DELETE /streams/{id}``, server shutdown): a dropped connection is
reconnected by the source, and the stream's timeline goes on. With ``reconnect=False`` (a
recording rather than a camera) it also ends when the source ends or drops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
import urllib.parse

import numpy as np

from rtsed.audio.network import UrlSource, redact
from rtsed.serve.protocol import CLOSE_NORMAL, StreamHeader
from rtsed.serve.session import SessionLimits, StreamSession

# Schemes a client of the HTTP API may ask the server to open: network protocols only, so that
# the API cannot make the server read its own files or devices (the command line can: the
# operator's own --input).
API_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "srt", "udp", "tcp", "rtp")


def check_api_url(url: object) -> str:
    """A URL the HTTP API accepts; ValueError naming the problem and the fix otherwise."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError('give the stream\'s URL as {"url": "rtsp://camera/stream"}')
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in API_SCHEMES:
        raise ValueError(f"url {redact(url)!r}: scheme {scheme or '(none)'!r} is not pulled over the API; use one of "
                         f"{', '.join(API_SCHEMES)} (files: rtsed.detect, or --input on the server's command line)")
    return url


class PulledStream:
    """One URL pulled into the worker. ``start()`` joins the worker (ServerFull when it is
    full) and starts the reader thread; ``stop()`` ends the stream (events closed and emitted)."""

    def __init__(self, url: str, name: str, model_rate_hz: int, hop_s: float, limits: SessionLimits,
                 loop: asyncio.AbstractEventLoop, worker, max_queued_s: float = 2.0, reconnect: bool = True,
                 **source_options):
        self.url = url
        self.worker = worker
        self.max_queued_s = max_queued_s
        self.source = UrlSource(url, model_rate_hz, reconnect=reconnect, **source_options)
        header = StreamHeader(model_rate_hz, 1, "f32le", {}, name or redact(url)[:100])
        # Pacing is the source's (live) or this thread's backpressure (faster inputs): neither
        # the flood limit nor the idle timeout of a client applies; a reconnecting source is silent.
        limits = dataclasses.replace(limits, max_ahead_s=math.inf, idle_timeout_s=math.inf,
                                     max_queue_s=max(limits.max_queue_s, 2 * max_queued_s))
        self.session = StreamSession(header, model_rate_hz, hop_s, limits, loop, client="pull")
        self.session.client_gone = True  # no socket: nothing is queued for one
        self.session.details = {"url": redact(url), "connected": False, "reconnects": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rtsed-pull-{self.session.id}", daemon=True)

    @property
    def id(self) -> int:
        return self.session.id

    def start(self) -> None:
        self.worker.add(self.session)
        self._thread.start()

    def stop(self, reason: str = "stopped over the API") -> None:
        """End the stream: audio already read is detected, open events are closed and emitted."""
        if self.session.request_end(CLOSE_NORMAL, reason):
            self.worker.wake.set()
        self._stop.set()
        self.source.stop()

    def _run(self) -> None:
        s = self.session
        try:
            while not self._stop.is_set() and s.end_code is None:
                block = self.source.read(timeout_s=0.25)
                s.details.update(connected=self.source.connected, reconnects=self.source.reconnects)
                if block is None:
                    break
                if not block.size:
                    continue
                while s.queued_s > self.max_queued_s and not self._stop.is_set() and s.end_code is None:
                    time.sleep(0.01)  # faster than real time: let the worker catch up
                s.offer(np.ascontiguousarray(block, dtype="<f4").tobytes())
                self.worker.wake.set()
        finally:
            reason = self.source.stats.end_reason or "the source ended"
            if s.request_end(CLOSE_NORMAL, reason):
                self.worker.wake.set()
            self.source.stop()
