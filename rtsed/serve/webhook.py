"""Finished events out as HTTP POSTs (``rtsed.serve --webhook URL``).

Each finished event is POSTed alone as JSON (``Content-Type: application/json``)::

    {"type": "event", "label": "dog", "onset_s": 1.24, "offset_s": 2.3, "score": 0.91,
     "stream": "kitchen", "stream_id": 3, "name": "kitchen"}

(times in stream seconds from the stream's first sample). The worker only queues the event
(bounded: ``max_queue``; beyond it new events are dropped and counted); one thread posts them
in order. A connection error, a timeout, HTTP 408, 429 or 5xx is retried with exponential
backoff (``backoff_s`` doubling to ``backoff_max_s``, ``max_attempts`` tries in all); any other
answer outside 2xx is the endpoint refusing the event and is not retried. Outcomes are counted
in ``rtsed_webhook_posts_total{result="delivered|failed|dropped"}`` and
``rtsed_webhook_retries_total``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from rtsed.serve.decode import OnsetNotice, SoundEvent
from rtsed.serve.outputs import EventOutput, StreamRef, item_payload
from rtsed.serve.telemetry import ServerMetrics

log = logging.getLogger("rtsed.serve.webhook")

RETRY_STATUSES = {408, 429}  # and every 5xx


def check_webhook_url(url: str) -> str:
    """The URL if it is an http(s) URL with a host; ValueError naming the problem otherwise."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--webhook {url!r}: give an http:// or https:// URL with a host, "
                         "e.g. http://127.0.0.1:8123/api/webhook/rtsed")
    return url


class WebhookPoster(EventOutput):
    """POSTs every finished event to ``url`` from a thread of its own; ``start()`` first."""

    def __init__(self, url: str, metrics: ServerMetrics, max_queue: int = 1000, max_attempts: int = 5,
                 timeout_s: float = 5.0, backoff_s: float = 0.5, backoff_max_s: float = 30.0):
        self.url = check_webhook_url(url)
        self.metrics = metrics
        self.max_attempts = max(1, max_attempts)
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._closing = threading.Event()
        self._deadline = float("inf")  # while closing: give up retrying after this (monotonic)
        self._thread = threading.Thread(target=self._run, name="rtsed-webhook", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ------------------------------------------------------------------ EventOutput (worker thread)
    def emit(self, stream: StreamRef, item: OnsetNotice | SoundEvent) -> None:
        if not isinstance(item, SoundEvent):
            return  # onsets go to the WebSocket and MQTT; a webhook gets finished events
        try:
            self._queue.put_nowait(item_payload(stream, item))
        except queue.Full:
            self.metrics.webhook_posts.labels(result="dropped").inc()

    def close(self, timeout_s: float = 5.0) -> None:
        """Post what is queued for up to ``timeout_s``; what is left then is counted as dropped."""
        self._deadline = time.monotonic() + timeout_s
        self._closing.set()  # also cuts a backoff wait short
        self._thread.join(timeout_s + self.timeout_s)
        left = 0
        while True:
            try:
                self._queue.get_nowait()
                left += 1
            except queue.Empty:
                break
        if left:
            self.metrics.webhook_posts.labels(result="dropped").inc(left)
            log.warning("webhook: %d event(s) not posted to %s at shutdown", left, self.url)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while True:
            try:
                payload = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            if self._closing.is_set() and time.monotonic() > self._deadline:
                self.metrics.webhook_posts.labels(result="dropped").inc()
                continue
            self._deliver(payload)

    def _deliver(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        what = f"{payload['label']} [{payload['onset_s']:g}, {payload['offset_s']:g}) s of {payload['stream']}"
        for attempt in range(1, self.max_attempts + 1):
            retry, problem = self._post(body)
            if problem is None:
                self.metrics.webhook_posts.labels(result="delivered").inc()
                return
            if not retry or attempt == self.max_attempts:
                break
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
            if self._closing.is_set() and time.monotonic() + delay > self._deadline:
                break
            self.metrics.webhook_retries.inc()
            log.info("webhook: POST of %s to %s failed (%s); retry %d/%d in %.1f s", what, self.url, problem,
                     attempt, self.max_attempts - 1, delay)
            self._closing.wait(delay)
        self.metrics.webhook_posts.labels(result="failed").inc()
        log.warning("webhook: gave up on %s after %d attempt(s) to %s: %s", what, attempt, self.url, problem)

    def _post(self, body: bytes) -> tuple[bool, str | None]:
        """One POST: (retry?, problem or None when delivered)."""
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "User-Agent": "rtsed"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
                return False, None
        except urllib.error.HTTPError as exc:
            retry = exc.code in RETRY_STATUSES or exc.code >= 500
            refusal = "" if retry else "; the endpoint refused the event, not retried"
            return retry, f"HTTP {exc.code} {exc.reason}{refusal}"
        except (urllib.error.URLError, OSError) as exc:  # refused, unreachable, timed out
            reason = getattr(exc, "reason", exc)
            return True, f"{type(reason).__name__}: {reason}"
