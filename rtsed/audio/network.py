"""Audio pulled from a URL through FFmpeg (PyAV): RTSP cameras, HTTP/Icecast streams, RTMP, SRT,
or anything else FFmpeg opens, as a reconnecting ``AudioSource``.

A URL is treated as a live stream that may drop: a connection that fails, stalls for longer
than ``read_timeout_s`` or ends is reconnected after a backoff (``backoff_min_s`` doubling to
``backoff_max_s``; back to the minimum once a connection has delivered audio), until
``stop()``. Only the first audio stream is demuxed and decoded; video and data streams are
never decoded (RTSP is asked for its audio tracks only, over TCP: no lost UDP packets). Samples
keep their rate and channels from FFmpeg; downmix and resampling to the model's rate are the
shared chain of ``AudioSource`` (soxr), re-built when a reconnection brings another rate.

Threads: a reader thread connects, decodes and queues (n, channels) float32 blocks, bounded
at ``queue_s`` seconds (beyond it the newest blocks are dropped and counted: the consumer is
too slow); ``read()`` runs the shared chain on the consumer's thread. Times count from the
stream's first sample: audio missed while a connection was down is not replaced, so later
events come earlier on that timeline by the outage (``stats.reconnects`` says there was one).
"""

from __future__ import annotations

import logging
import queue
import threading
import urllib.parse
from dataclasses import dataclass

import numpy as np

from rtsed.audio.sources import AudioSource, AudioSourceError, StreamingResampler

log = logging.getLogger("rtsed.audio.network")

_END = object()
_DROPPED = object()  # a connection's audio is complete


@dataclass(frozen=True)
class _Connected:
    """Marks the start of a connection's audio in the queue: its rate and channel count."""

    rate_hz: int
    channels: int


def redact(url: str) -> str:
    """The URL without a password (for logs and listings)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def is_url(text: str) -> bool:
    """Whether an ``--input`` is a URL (``scheme://...``) rather than a file path."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isalpha() and len(scheme) > 1


class UrlSource(AudioSource):
    """Audio from ``url``, at ``target_rate_hz`` mono, reconnecting until ``stop()``.

    open_timeout_s / read_timeout_s: how long a connection may take to open / go without data
    before it counts as dropped. ``reconnect=False``: end at the first drop or end of stream.
    """

    def __init__(self, url: str, target_rate_hz: int, block_s: float = 0.02, quality: str = "VHQ",
                 open_timeout_s: float = 10.0, read_timeout_s: float = 10.0, reconnect: bool = True,
                 backoff_min_s: float = 0.5, backoff_max_s: float = 30.0, queue_s: float = 10.0):
        try:
            import av  # noqa: F401
        except ImportError:
            raise AudioSourceError("a URL input needs PyAV (FFmpeg): pip install 'rtsed[serve]' (or pip install av)") \
                from None
        self.url = url
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        self.reconnect = reconnect
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.queue_s = queue_s
        self.reconnects = 0
        self.connected = False
        self._queue: queue.Queue = queue.Queue()
        self._queued_s = 0.0
        self._queued_lock = threading.Lock()
        self._stop = threading.Event()
        self._dropped_blocks = 0
        self._dropped_samples = 0
        self._segments = 0
        self._thread = threading.Thread(target=self._pull, name=f"rtsed-url {redact(url)}"[:60], daemon=True)
        # The rate is FFmpeg's to tell, once connected: a passthrough until then.
        super().__init__(target_rate_hz, target_rate_hz, 1, redact(url), block_s, quality)

    def ffmpeg_options(self) -> dict[str, str]:
        """Demuxer options: RTSP over TCP with its audio tracks only."""
        scheme = urllib.parse.urlsplit(self.url).scheme.lower()
        if scheme in ("rtsp", "rtsps"):
            return {"rtsp_transport": "tcp", "allowed_media_types": "audio"}
        return {}

    # -- AudioSource ------------------------------------------------------------------------
    def _open(self) -> None:
        self._thread.start()

    def _close(self) -> None:
        self._stop.set()

    def _ring_counters(self) -> tuple[int, int, int]:
        return self._dropped_blocks, self._dropped_samples, 0

    @property
    def stats(self):
        s = super().stats
        s.reconnects = self.reconnects
        return s

    def read(self, timeout_s: float = 0.1) -> np.ndarray | None:
        """The next mono float32 block at sample_rate_hz (may be empty), or None once stopped
        (or, with reconnect=False, dropped) and drained."""
        if self._done:
            return None
        self.start()
        if not self._started:  # stopped before it ever started: no reader thread, nothing to come
            self._done = True
            return None
        try:
            item = self._queue.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return np.zeros(0, np.float32)
        if item is _END:
            self._done = True
            tail = self.resampler.flush()
            self._stats.samples_out += len(tail)
            return tail
        if item is _DROPPED:
            # The connection's audio is complete: what soxr holds back of it comes out now.
            tail = self.resampler.flush()
            self.resampler.reset()
            self._stats.samples_out += len(tail)
            return tail
        if isinstance(item, _Connected):  # what follows may have another rate
            if item.rate_hz != self.resampler.in_rate_hz:
                self.resampler = StreamingResampler(item.rate_hz, self.sample_rate_hz, self.resampler.quality,
                                                    max(1, round(self.block_s * item.rate_hz)))
            self._stats.device_rate_hz = float(item.rate_hz)
            self._stats.channels = item.channels
            self._stats.resampler_delay_s = self.resampler.delay_s
            return np.zeros(0, np.float32)
        with self._queued_lock:
            self._queued_s -= item.shape[0] / self._stats.device_rate_hz
        return self._process(item)

    # -- the reader thread ------------------------------------------------------------------
    def _put_audio(self, block: np.ndarray, rate_hz: int) -> None:
        seconds = block.shape[0] / rate_hz
        with self._queued_lock:
            if self._queued_s + seconds > self.queue_s:
                self._dropped_blocks += 1
                self._dropped_samples += block.shape[0]
                return
            self._queued_s += seconds
        self._queue.put(block)

    def _pull(self) -> None:
        import av

        delay = self.backoff_min_s
        where = redact(self.url)
        try:
            while not self._stop.is_set():
                delivered, problem = False, "the stream ended"
                container = None
                first = True
                try:
                    container = av.open(self.url, options=self.ffmpeg_options(),
                                        timeout=(self.open_timeout_s, self.read_timeout_s))
                    if not container.streams.audio:
                        kinds = ", ".join(s.type for s in container.streams) or "none"
                        raise AudioSourceError(f"no audio stream (streams: {kinds}); point the URL at a source "
                                               "with audio")
                    stream = container.streams.audio[0]
                    resampler = av.AudioResampler(format="fltp")  # planar float32, same rate and layout
                    for packet in container.demux(stream):  # this stream's packets only
                        if self._stop.is_set():
                            break
                        for frame in packet.decode():
                            for out in resampler.resample(frame):
                                if first:
                                    self._queue.put(_Connected(out.rate, len(out.layout.channels)))
                                    first = False
                                    self.connected = True
                                    if self.reconnects:
                                        log.warning("%s: reconnected (%d Hz, %d channel(s))", where, out.rate,
                                                    len(out.layout.channels))
                                self._put_audio(np.ascontiguousarray(out.to_ndarray().T, dtype=np.float32),
                                                out.rate)
                                delivered = True
                except (av.error.FFmpegError, AudioSourceError, OSError, ValueError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                finally:
                    self.connected = False
                    if container is not None:
                        container.close()
                    if not first:
                        self._queue.put(_DROPPED)
                if self._stop.is_set():
                    break
                if not self.reconnect:
                    self._stats.end_reason = f"{where}: {problem}"
                    break
                if delivered:
                    delay = self.backoff_min_s
                self.reconnects += 1
                log.warning("%s: %s; reconnecting in %.1f s", where, problem, delay)
                if self._stop.wait(delay):
                    break
                delay = min(self.backoff_max_s, delay * 2)
        finally:
            self._queue.put(_END)
