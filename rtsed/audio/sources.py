"""Audio sources: a microphone, a file or an array, yielding mono float32 blocks at the model's rate.

Every source runs the same consumer-side chain (docs/architecture.md)::

    raw (n, channels) float32 at the device/file rate
      -> Sanitizer (NaN/Inf -> 0, counted; clipped samples counted)
      -> downmix (channel mean)
      -> StreamingResampler (soxr, streaming) -> (m,) float32 at target_rate_hz

For a microphone, the PortAudio callback only copies the device's samples into a bounded
``SampleRing``; everything above runs in ``read()`` on the consumer (engine) thread, so a slow
consumer costs dropped blocks (counted, shown in ``stats``), never a stalled or crashed stream.

``read(timeout_s)`` returns a block (possibly empty: nothing arrived yet, or soxr is still
filling its internal block) or ``None`` at end of stream; the flushed resampler tail is returned as
the last block before ``None``. Times count from the stream's first sample: samples dropped by an
overflowing ring shift later audio earlier on that timeline, which is why drops are counted.

``sounddevice`` is imported lazily: files and arrays stream without PortAudio installed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import soxr

from rtsed.audio.files import CLIP_LEVEL, open_sound_file

# Level reported for digital silence (log of zero), and the level below which a block is "silent".
LEVEL_FLOOR_DBFS = -120.0
SILENCE_DBFS = -80.0
# A device that offers many channels (e.g. ALSA "default": 32) is opened with at most this many;
# they are averaged (downmix).
MAX_CHANNELS = 2
# Sample rates tried, after the device's default, when the device refuses a rate.
_FALLBACK_RATES_HZ = (48000, 44100, 32000, 22050, 16000, 8000)


class AudioSourceError(RuntimeError):
    """A source that cannot start or run; the message says what failed and what to do."""


class AudioDeviceError(AudioSourceError):
    """No usable audio input device, an unknown/ambiguous name, a busy or failing device,
    or a missing PortAudio/sounddevice; the message names the device and lists the alternatives."""


class AudioDeviceTimeout(AudioDeviceError):
    """The audio system did not answer while a device was being listed or opened (a frozen or
    hung audio server). The call that waited is left blocked on a daemon thread, so the process
    should end with ``os._exit``: PortAudio's exit handler would block on the same server."""


# How long listing and opening an input device may take. PortAudio answers in well under a
# second when the audio server is alive; a SIGSTOPped PulseAudio kept `import sounddevice`
# (PortAudio's initialisation, which probes every ALSA device) blocked for about two minutes,
# after which it listed no device at all.
DEVICE_OPEN_TIMEOUT_S = 10.0


def _bounded(call, timeout_s: float, what: str):
    """call() on a daemon thread, waited for at most timeout_s -> its result (or its exception).
    AudioDeviceTimeout naming ``what`` when it has not returned by then."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = call()
        except BaseException as exc:  # handed to the waiting thread
            box["error"] = exc

    # sounddevice points file descriptor 2 at /dev/null while PortAudio initialises (to hide
    # ALSA's chatter); when that never returns, stderr stays silenced unless it is put back.
    try:
        stderr_fd = os.dup(2)
    except OSError:
        stderr_fd = None
    worker = threading.Thread(target=run, name="rtsed-audio-open", daemon=True)
    worker.start()
    worker.join(timeout_s)
    alive = worker.is_alive()
    if stderr_fd is not None:
        if alive:
            os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
    if alive:
        raise AudioDeviceTimeout(
            f"the audio system did not answer within {timeout_s:g} s while {what}: the audio server "
            "(PulseAudio, PipeWire, JACK) may be frozen or hung. Check it (e.g. `pactl info`), restart it "
            "(`systemctl --user restart pulseaudio` or pipewire), or raise --open-timeout-s on a very busy "
            "machine; --input FILE streams a file without it")
    if "error" in box:
        raise box["error"]
    return box["result"]


# ---------------------------------------------------------------------------------------------
# Ring buffer
# ---------------------------------------------------------------------------------------------


class SampleRing:
    """A bounded single-producer/single-consumer ring of float32 frames (capacity_frames, channels).

    The producer (the PortAudio callback thread) calls ``write``; the consumer (the engine thread)
    calls ``read``. The buffer is preallocated; ``write`` copies into it and allocates no sample
    memory. The lock guards only the two index updates and the consumer's wait; copies run outside
    it (each side copies only the region the other side does not touch).

    Drop policy: **drop newest, whole block**. A write that does not fit entirely in the free space
    is discarded and counted (``dropped_blocks``, ``dropped_frames``); what is already buffered is
    never overwritten. So the producer never moves the consumer's index, a reader never sees data
    change under its copy, and every gap in the stream falls on a block boundary.
    """

    def __init__(self, capacity_frames: int, channels: int = 1):
        if capacity_frames < 1 or channels < 1:
            raise ValueError(f"SampleRing needs capacity_frames >= 1 and channels >= 1, "
                             f"got {capacity_frames}, {channels}")
        self._buf = np.zeros((int(capacity_frames), int(channels)), dtype=np.float32)
        self._cap = int(capacity_frames)
        self._head = 0  # frames ever written (producer-owned; published under the lock)
        self._tail = 0  # frames ever read (consumer-owned; published under the lock)
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        # Producer-side counters (plain ints: the consumer only reads them).
        self.dropped_blocks = 0
        self.dropped_frames = 0
        self.written_frames = 0

    @property
    def capacity_frames(self) -> int:
        return self._cap

    @property
    def channels(self) -> int:
        return self._buf.shape[1]

    @property
    def closed(self) -> bool:
        return self._closed

    def available(self) -> int:
        """Frames buffered and not yet read."""
        with self._cond:
            return self._head - self._tail

    def free(self) -> int:
        """Frames that a write can still take without dropping."""
        return self._cap - self.available()

    def write(self, block: np.ndarray) -> bool:
        """Append block (n, channels) (or (n,) when channels == 1). False when it was dropped
        (ring full, or closed). Safe to call from an audio callback: no sample allocation."""
        if block.ndim == 1:
            block = block.reshape(-1, 1)
        n = block.shape[0]
        if n == 0:
            return True
        with self._cond:
            used = self._head - self._tail
            closed = self._closed
        if closed or n > self._cap - used:
            self.dropped_blocks += 1
            self.dropped_frames += n
            return False
        start = self._head % self._cap
        first = min(n, self._cap - start)
        self._buf[start:start + first] = block[:first]
        if first < n:
            self._buf[: n - first] = block[first:]
        with self._cond:
            self._head += n
            self._cond.notify()
        self.written_frames += n
        return True

    def read(self, max_frames: int, timeout_s: float | None = None, min_frames: int = 1) -> np.ndarray | None:
        """Up to max_frames buffered frames as a new (n, channels) array.

        Waits until at least min_frames (capped at the capacity) are buffered, the ring is closed,
        or timeout_s passes (None: no limit); then returns what is there, which may be fewer than
        min_frames or none at all ((0, channels)). None once the ring is closed and empty.
        """
        min_frames = max(1, min(int(min_frames), self._cap, int(max_frames)))
        deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while self._head - self._tail < min_frames and not self._closed:
                if deadline is None:
                    self._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            avail = self._head - self._tail
            if avail == 0 and self._closed:
                return None
        n = min(avail, int(max_frames))
        out = np.empty((n, self._buf.shape[1]), dtype=np.float32)
        start = self._tail % self._cap
        first = min(n, self._cap - start)
        out[:first] = self._buf[start:start + first]
        if first < n:
            out[first:] = self._buf[: n - first]
        with self._cond:
            self._tail += n
        return out

    def close(self) -> None:
        """No more writes; readers drain what is left, then get None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# ---------------------------------------------------------------------------------------------
# Resampling and sanitising
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _measure_delay(in_rate_hz: float, out_rate_hz: float, quality: str, block_frames: int) -> tuple[float, float]:
    """(min, max) output samples that soxr holds back, fed zeros in blocks of block_frames.

    soxr's pending output is a sawtooth: it never falls below the filter's group delay and rises by
    soxr's internal processing block before each burst of output. Measured after 0.5 s of warm-up
    over 2 s of input (several sawtooth periods at every rate and quality tried).
    """
    stream = soxr.ResampleStream(in_rate_hz, out_rate_hz, 1, dtype="float32", quality=quality)
    block = np.zeros(block_frames, dtype=np.float32)
    ratio = out_rate_hz / in_rate_hz
    fed = produced = 0
    lo, hi = math.inf, 0.0
    while fed < 2.5 * in_rate_hz:
        produced += len(stream.resample_chunk(block))
        fed += block_frames
        if fed >= 0.5 * in_rate_hz:
            pending = fed * ratio - produced
            lo, hi = min(lo, pending), max(hi, pending)
    return lo, hi


class StreamingResampler:
    """Mono float32 streaming resampler (soxr.ResampleStream); a passthrough when rates are equal.

    Streamed output in any chunking equals ``soxr.resample`` of the whole signal at the same
    quality (measured: bitwise; tests allow 1e-6), so quality "VHQ" matches ``read_audio``.

    Delay: the output for an input sample comes out ``delay`` later. soxr holds back between
    ``group_delay_s`` (the filter's lookahead) and ``delay_s`` (that plus soxr's internal block,
    worst case) of output; both are measured at construction with blocks of ``block_frames`` input
    samples. Add ``delay_s`` to the algorithmic latency (docs/streaming.md: + the resampler's delay).
    """

    def __init__(self, in_rate_hz: float, out_rate_hz: float, quality: str = "VHQ",
                 block_frames: int | None = None):
        if not (in_rate_hz > 0 and out_rate_hz > 0):
            raise ValueError(f"sample rates must be positive, got {in_rate_hz} -> {out_rate_hz}")
        self.in_rate_hz = float(in_rate_hz)
        self.out_rate_hz = float(out_rate_hz)
        self.quality = quality
        self.passthrough = self.in_rate_hz == self.out_rate_hz
        self._stream = None
        if self.passthrough:
            self.group_delay_s = self.delay_s = 0.0
        else:
            self._stream = soxr.ResampleStream(self.in_rate_hz, self.out_rate_hz, 1,
                                               dtype="float32", quality=quality)
            block = int(block_frames) if block_frames else max(1, round(0.02 * self.in_rate_hz))
            lo, hi = _measure_delay(self.in_rate_hz, self.out_rate_hz, quality, block)
            self.group_delay_s = lo / self.out_rate_hz
            self.delay_s = hi / self.out_rate_hz
        self._flushed = False

    def process(self, x: np.ndarray) -> np.ndarray:
        """x: (n,) float32 at in_rate_hz -> (m,) float32 at out_rate_hz (m may be 0)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self._stream is None:
            return x
        if self._flushed:
            raise RuntimeError("StreamingResampler: process() after flush(); call reset() first")
        return self._stream.resample_chunk(x, last=False)

    def flush(self) -> np.ndarray:
        """End of stream: the output still held back (m,). Call once; reset() to reuse."""
        if self._stream is None or self._flushed:
            return np.zeros(0, dtype=np.float32)
        self._flushed = True
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)

    def reset(self) -> None:
        if self._stream is not None:
            self._stream.clear()
        self._flushed = False


class Sanitizer:
    """Makes every block safe for the model, never raising: NaN/Inf -> 0 (counted in
    ``nonfinite``), samples with |x| >= CLIP_LEVEL counted in ``clipped`` (left as they are).
    Counts are of values, all channels together."""

    def __init__(self, clip_level: float = CLIP_LEVEL):
        self.clip_level = clip_level
        self.nonfinite = 0
        self.clipped = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: float32 array of any shape, fixed in place and returned."""
        if x.size == 0:
            return x
        finite = np.isfinite(x)
        if not finite.all():
            bad = ~finite
            self.nonfinite += int(np.count_nonzero(bad))
            x[bad] = 0.0
        self.clipped += int(np.count_nonzero(np.abs(x) >= self.clip_level))
        return x


def level_dbfs(x: np.ndarray) -> tuple[float, float]:
    """(RMS, peak) of x in dB relative to full scale (1.0), floored at LEVEL_FLOOR_DBFS.
    A full-scale sine has RMS -3 dBFS."""
    if x.size == 0:
        return LEVEL_FLOOR_DBFS, LEVEL_FLOOR_DBFS
    x64 = x.astype(np.float64, copy=False)
    rms = math.sqrt(float(np.mean(x64 * x64)))
    peak = float(np.max(np.abs(x64)))
    floor = 10.0 ** (LEVEL_FLOOR_DBFS / 20)
    return 20 * math.log10(max(rms, floor)), 20 * math.log10(max(peak, floor))


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


@dataclass
class SourceStats:
    """What a terminal view shows about a source. ``samples_in`` counts frames at the device/file
    rate (per channel), ``samples_out`` mono samples at target_rate_hz; ``dropped_*`` are ring
    drops (consumer too slow), ``overflows`` PortAudio's input-overflow flags (host too slow);
    ``nonfinite_replaced`` / ``clipped_samples`` count values over all channels; levels are of the
    last block (mono, before resampling); ``silence_s`` is how long the input has stayed below
    SILENCE_DBFS (a muted or dead microphone); ``end_reason`` is set when the stream has ended;
    ``failure`` says what went wrong when it ended because the input failed (a decoding error, a
    device that stopped by itself), None when it ended normally (end of file, stopped)."""

    device_name: str = ""
    device_rate_hz: float = 0.0
    channels: int = 0
    target_rate_hz: int = 0
    resampler_delay_s: float = 0.0
    device_latency_s: float = 0.0
    samples_in: int = 0
    samples_out: int = 0
    dropped_blocks: int = 0
    dropped_samples: int = 0
    overflows: int = 0
    nonfinite_replaced: int = 0
    clipped_samples: int = 0
    level_dbfs: float = LEVEL_FLOOR_DBFS
    peak_dbfs: float = LEVEL_FLOOR_DBFS
    silence_s: float = 0.0
    end_reason: str | None = None
    reconnects: int = 0  # a URL source's attempts to reconnect after a drop (rtsed.audio.network)
    failure: str | None = None


class AudioSource:
    """Base of all sources: ``start()``, ``read(timeout_s)``, ``stop()``, context manager,
    iteration (non-empty blocks until end of stream) and ``stats`` (a snapshot).

    Subclasses implement ``_open()``, ``_read_raw(timeout_s)`` -> (n, channels) float32 array
    (possibly empty) or None when exhausted, and ``_close()``.
    """

    def __init__(self, target_rate_hz: int, in_rate_hz: float, channels: int, name: str,
                 block_s: float, quality: str = "VHQ"):
        if block_s <= 0:
            raise ValueError(f"block_s must be > 0, got {block_s}")
        self.sample_rate_hz = int(target_rate_hz)
        self.block_s = float(block_s)
        self.block_frames = max(1, round(block_s * in_rate_hz))
        self.resampler = StreamingResampler(in_rate_hz, target_rate_hz, quality, self.block_frames)
        self._sanitizer = Sanitizer()
        self._stats = SourceStats(device_name=name, device_rate_hz=float(in_rate_hz),
                                  channels=int(channels), target_rate_hz=int(target_rate_hz),
                                  resampler_delay_s=self.resampler.delay_s)
        self._started = False
        self._stopped = False
        self._done = False

    # -- subclass hooks ---------------------------------------------------------------------
    def _open(self) -> None:
        pass

    def _read_raw(self, timeout_s: float) -> np.ndarray | None:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def _ring_counters(self) -> tuple[int, int, int]:
        """(dropped_blocks, dropped_samples, overflows) kept by the producer side."""
        return 0, 0, 0

    # -- public API -----------------------------------------------------------------------
    @property
    def delay_s(self) -> float:
        """Worst-case resampler delay (0 when no resampling): add it to the latency."""
        return self.resampler.delay_s

    @property
    def stats(self) -> SourceStats:
        s = dataclasses.replace(self._stats)
        s.dropped_blocks, s.dropped_samples, s.overflows = self._ring_counters()
        s.nonfinite_replaced = self._sanitizer.nonfinite
        s.clipped_samples = self._sanitizer.clipped
        return s

    def start(self) -> None:
        """Open the device/file and begin capturing. Idempotent; a stopped source stays stopped."""
        if not self._started and not self._stopped:
            self._open()
            self._started = True

    def read(self, timeout_s: float = 0.1) -> np.ndarray | None:
        """The next mono float32 block at sample_rate_hz (may be empty), or None at end of stream.
        Starts the source if needed."""
        if self._done:
            return None
        self.start()
        raw = self._read_raw(timeout_s) if self._started else None
        if raw is None:
            self._done = True
            if self._stats.end_reason is None:
                self._stats.end_reason = "end of stream"
            tail = self.resampler.flush()
            self._stats.samples_out += len(tail)
            return tail
        return self._process(raw)

    def stop(self) -> None:
        """Stop capturing/reading. Idempotent. Later reads return what was already captured (a
        microphone's ring), then the resampler's tail, then None: a consumer on another thread
        ends its stream cleanly."""
        if self._stats.end_reason is None:
            self._stats.end_reason = "stopped"
        if not self._stopped:
            self._stopped = True
            if self._started:
                self._close()

    def stop_async(self) -> threading.Event:
        """Begin ``stop()`` on a daemon thread -> an Event set once it has returned.

        Closing an audio device can block for good (PortAudio's stop waits on an audio server that
        was frozen or hangs); a caller that must finish anyway waits on the Event with a timeout
        and goes on without the device when it stays unset. Such a process should end with
        ``os._exit``: PortAudio's exit handler would block on the same device."""
        done = threading.Event()

        def stop_then_signal() -> None:
            try:
                self.stop()
            finally:
                done.set()

        threading.Thread(target=stop_then_signal, name="rtsed-audio-close", daemon=True).start()
        return done

    def __enter__(self) -> "AudioSource":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __iter__(self) -> Iterator[np.ndarray]:
        self.start()
        while (block := self.read()) is not None:
            if len(block):
                yield block

    # -- the shared consumer-side chain -----------------------------------------------------
    def _process(self, raw: np.ndarray) -> np.ndarray:
        """raw (n, channels) float32, owned by us (modified in place) -> (m,) float32 at target."""
        if raw.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        self._sanitizer(raw)
        mono = raw.mean(axis=1, dtype=np.float32) if raw.shape[1] > 1 else raw[:, 0]
        st = self._stats
        st.samples_in += raw.shape[0]
        st.level_dbfs, st.peak_dbfs = level_dbfs(mono)
        if st.level_dbfs < SILENCE_DBFS:
            st.silence_s += raw.shape[0] / st.device_rate_hz
        else:
            st.silence_s = 0.0
        out = self.resampler.process(mono)
        st.samples_out += len(out)
        return out


class ArraySource(AudioSource):
    """An in-memory signal, samples (N,) or (N, channels), streamed in blocks of block_s as fast as
    it is read. Integer samples are scaled to [-1, 1) (int16: / 32768)."""

    def __init__(self, samples: np.ndarray, sample_rate_hz: float, target_rate_hz: int,
                 block_s: float = 0.02, quality: str = "VHQ", name: str = "array"):
        x = np.asarray(samples)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise ValueError(f"ArraySource needs samples (N,) or (N, channels), got shape {x.shape}")
        if np.issubdtype(x.dtype, np.signedinteger):
            x = x.astype(np.float32) / np.float32(-np.iinfo(x.dtype).min)
        self._x = np.asarray(x, dtype=np.float32)
        self._pos = 0
        super().__init__(target_rate_hz, sample_rate_hz, self._x.shape[1], name, block_s, quality)

    def _read_raw(self, timeout_s: float) -> np.ndarray | None:
        if self._stopped or self._pos >= self._x.shape[0]:
            return None
        block = self._x[self._pos:self._pos + self.block_frames].copy()  # sanitised in place
        self._pos += block.shape[0]
        return block


class FileSource(AudioSource):
    """A sound file streamed in blocks of block_s (soundfile: WAV, FLAC, OGG, ...), never read
    whole. realtime=True paces blocks by the wall clock like a microphone (a block is returned
    once its last sample's time has passed since start()); else as fast as read.

    Unreadable/empty files raise AudioFileError naming the file (at construction). A decoding
    error partway ends the stream with ``stats.end_reason`` saying where; NaN/Inf samples are
    replaced and counted (read_audio refuses such files; a stream keeps going)."""

    def __init__(self, path: str | Path, target_rate_hz: int, realtime: bool = False,
                 block_s: float = 0.02, quality: str = "VHQ"):
        self.path = Path(path)
        self.realtime = realtime
        self._file = open_sound_file(self.path)  # AudioFileError: not found, undecodable, empty
        self._t0 = 0.0
        self._frames_read = 0
        super().__init__(target_rate_hz, self._file.samplerate, self._file.channels,
                         self.path.name, block_s, quality)

    @property
    def duration_s(self) -> float:
        return self._file.frames / self._file.samplerate

    def _open(self) -> None:
        self._t0 = time.monotonic()

    def _read_raw(self, timeout_s: float) -> np.ndarray | None:
        if self._file.closed:
            return None
        remaining = self._file.frames - self._frames_read
        if self.realtime and remaining > 0:
            # Like a microphone: a block exists once its last sample's time has passed.
            due = self._t0 + (self._frames_read + min(self.block_frames, remaining)) / self._file.samplerate
            wait = due - time.monotonic()
            if wait > timeout_s:
                time.sleep(max(0.0, timeout_s))
                return np.zeros((0, self._file.channels), dtype=np.float32)
            if wait > 0:
                time.sleep(wait)
        try:
            block = self._file.read(self.block_frames, dtype="float32", always_2d=True)
        except Exception as exc:
            self._stats.end_reason = self._stats.failure = (
                f"{self.path}: decoding failed at {self._frames_read / self._file.samplerate:.2f} s ({exc})")
            return None
        if block.shape[0] == 0:
            self._stats.end_reason = "end of file"
            return None
        self._frames_read += block.shape[0]
        return block

    def _close(self) -> None:
        self._file.close()

    def stop(self) -> None:
        super().stop()
        if not self._file.closed:  # also when never started
            self._file.close()


# ---------------------------------------------------------------------------------------------
# Microphone (sounddevice / PortAudio)
# ---------------------------------------------------------------------------------------------


def _import_sounddevice():
    """The sounddevice module, or AudioDeviceError saying which install is missing."""
    try:
        return importlib.import_module("sounddevice")
    except ImportError:
        raise AudioDeviceError(
            "live audio input needs the sounddevice package: pip install 'rtsed[live]' "
            "(or pip install sounddevice); --input FILE streams a file without it"
        ) from None
    except OSError as exc:  # sounddevice raises OSError('PortAudio library not found')
        raise AudioDeviceError(
            f"sounddevice cannot load the PortAudio library ({exc}): install it, e.g. "
            "apt-get install libportaudio2 (Debian/Ubuntu), dnf install portaudio (Fedora), "
            "brew install portaudio (macOS); --input FILE streams a file without it"
        ) from None


def list_input_devices(timeout_s: float | None = DEVICE_OPEN_TIMEOUT_S) -> list[dict]:
    """Input devices PortAudio sees: dicts with index, name, hostapi, max_input_channels,
    default_samplerate_hz, is_default. AudioDeviceTimeout when the audio system does not answer
    within timeout_s (None: wait as long as it takes)."""
    if timeout_s is not None:
        return _bounded(lambda: list_input_devices(None), timeout_s, "listing the audio input devices")
    sd = _import_sounddevice()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
        default_in = sd.default.device[0]
    except Exception as exc:  # PortAudioError
        raise AudioDeviceError(f"PortAudio cannot list audio devices: {exc}") from None
    if default_in is None or default_in < 0:
        default_in = -1
    out = []
    for index, dev in enumerate(devices):
        if dev["max_input_channels"] <= 0:
            continue
        out.append({
            "index": index,
            "name": dev["name"],
            "hostapi": hostapis[dev["hostapi"]]["name"],
            "max_input_channels": int(dev["max_input_channels"]),
            "default_samplerate_hz": float(dev["default_samplerate"]),
            "is_default": index == default_in,
        })
    return out


_NO_DEVICES = (
    "no audio input device found (PortAudio lists none). Plug in or enable a microphone; on Linux "
    "check `arecord -l`, that PulseAudio/PipeWire runs, or that your user is in the `audio` group. "
    "--input FILE streams a file instead."
)


def format_device_list(devices: list[dict] | None = None) -> str:
    """A table of input devices for --list-devices (* marks the default)."""
    if devices is None:
        devices = list_input_devices()
    if not devices:
        return _NO_DEVICES
    name_w = max(4, *(len(d["name"]) for d in devices))
    api_w = max(8, *(len(d["hostapi"]) for d in devices))
    lines = [f"    {'idx':>3}  {'name':<{name_w}}  {'host API':<{api_w}}  {'in ch':>5}  {'rate Hz':>7}"]
    for d in devices:
        mark = "*" if d["is_default"] else " "
        lines.append(f"  {mark} {d['index']:>3}  {d['name']:<{name_w}}  {d['hostapi']:<{api_w}}  "
                     f"{d['max_input_channels']:>5}  {d['default_samplerate_hz']:>7.0f}")
    lines.append("  (* = default input; choose with --input-device INDEX or a part of the name)")
    return "\n".join(lines)


def resolve_input_device(device: int | str | None, devices: list[dict] | None = None) -> dict:
    """The input device meant by device: None (the default input), an index (int or digit
    string) or a case-insensitive name substring (an exact name wins). AudioDeviceError, listing
    the input devices, when there is none, nothing matches, or a name is ambiguous."""
    if devices is None:
        devices = list_input_devices()
    if not devices:
        raise AudioDeviceError(_NO_DEVICES)
    listing = "available input devices:\n" + format_device_list(devices)
    if isinstance(device, str) and device.strip().isdigit():
        device = int(device.strip())
    if device is None:
        default = [d for d in devices if d["is_default"]]
        if not default:
            raise AudioDeviceError(f"there is no default input device; pick one with --input-device; {listing}")
        return default[0]
    if isinstance(device, (int, np.integer)):
        match = [d for d in devices if d["index"] == int(device)]
        if not match:
            raise AudioDeviceError(f"input device {device} does not exist or has no input channels; {listing}")
        return match[0]
    query = str(device).casefold().strip()
    exact = [d for d in devices if d["name"].casefold() == query]
    match = exact or [d for d in devices if query in d["name"].casefold()]
    if not match:
        raise AudioDeviceError(f"no input device name contains {device!r}; {listing}")
    if len(match) > 1:
        names = ", ".join(f"{d['index']}: {d['name']!r}" for d in match)
        raise AudioDeviceError(
            f"{device!r} matches several input devices ({names}); give the index or more of the name; {listing}")
    return match[0]


class MicrophoneSource(AudioSource):
    """The default or a chosen input device, at the rate and channel count it offers.

    The stream is opened at the device's default rate (or the first of target_rate_hz, 48000,
    44100, ... that it accepts) with min(max_input_channels, MAX_CHANNELS) channels, float32. The
    PortAudio callback only copies into a SampleRing of ring_s seconds (drop-newest when full) and
    counts input overflows; downmix, resampling and sanitising run in ``read()``.
    ``latency`` is PortAudio's suggested latency ("high" tolerates a busy machine best).
    Finding the device (here) and opening it (``start()``) each wait at most ``open_timeout_s``
    for the audio system, then raise AudioDeviceTimeout (see there).
    """

    def __init__(self, target_rate_hz: int, device: int | str | None = None, block_s: float = 0.02,
                 ring_s: float = 10.0, channels: int | None = None, latency: str | float = "high",
                 quality: str = "VHQ", open_timeout_s: float = DEVICE_OPEN_TIMEOUT_S):
        if not open_timeout_s > 0:
            raise ValueError(f"open_timeout_s must be > 0 seconds, got {open_timeout_s}")
        self.open_timeout_s = float(open_timeout_s)

        def find() -> tuple[Any, dict, float]:
            sd = _import_sounddevice()
            dev = resolve_input_device(device, list_input_devices(None))
            n_channels = int(channels) if channels else min(dev["max_input_channels"], MAX_CHANNELS)
            return sd, dev, n_channels

        what = "finding the audio input device" if device is None else f"finding audio input device {device!r}"
        self._sd, dev, self.channels = _bounded(find, self.open_timeout_s, what)
        self.device = dev
        self.device_index = dev["index"]
        self.latency = latency
        self.rate_hz = _bounded(lambda: self._pick_rate(dev, target_rate_hz), self.open_timeout_s,
                                f"checking the sample rates of {dev['name']!r}")
        self._ring = SampleRing(max(1, round(ring_s * self.rate_hz)), self.channels)
        self._overflows = 0
        self._callback_errors = 0
        self._stream = None
        self._stopping = False
        super().__init__(target_rate_hz, self.rate_hz, self.channels,
                         f"{dev['name']} ({dev['hostapi']})", block_s, quality)
        self._read_max = self._ring.capacity_frames

    def _describe(self, rate: float | None = None) -> str:
        rate = self.rate_hz if rate is None else rate
        d = self.device
        return (f"input device {d['index']} {d['name']!r} ({d['hostapi']}) at {rate:.0f} Hz, "
                f"{self.channels} channel(s)")

    def _pick_rate(self, dev: dict, target_rate_hz: int) -> float:
        sd = self._sd
        tried, last_error = [], ""
        for rate in (dev["default_samplerate_hz"], float(target_rate_hz), *map(float, _FALLBACK_RATES_HZ)):
            if rate in tried or rate <= 0:
                continue
            tried.append(rate)
            try:
                sd.check_input_settings(device=dev["index"], channels=self.channels,
                                        dtype="float32", samplerate=rate)
                return rate
            except Exception as exc:  # PortAudioError / ValueError
                last_error = str(exc)
        raise AudioDeviceError(
            f"input device {dev['index']} {dev['name']!r} ({dev['hostapi']}) accepts none of the "
            f"sample rates {', '.join(f'{r:.0f}' for r in tried)} Hz with {self.channels} float32 "
            f"channel(s) (PortAudio: {last_error}); pick another with --input-device (see --list-devices)")

    # Runs on PortAudio's thread: copy and count only, never raise.
    def _callback(self, indata, frames, time_info, status) -> None:
        try:
            if status.input_overflow:
                self._overflows += 1
            self._ring.write(indata)
        except Exception:
            self._callback_errors += 1

    def _finished(self) -> None:
        if not self._stopping and self._stats.end_reason is None:
            self._stats.end_reason = self._stats.failure = (
                f"the input stream stopped ({self._describe()}: unplugged or failed?)")
        self._ring.close()

    def _open(self) -> None:
        _bounded(self._open_stream, self.open_timeout_s, f"opening {self._describe()}")
        self._stats.device_latency_s = float(self._stream.latency)

    def _open_stream(self) -> None:
        sd = self._sd
        try:
            self._stream = sd.InputStream(
                device=self.device_index, channels=self.channels, samplerate=self.rate_hz,
                dtype="float32", blocksize=self.block_frames, latency=self.latency,
                callback=self._callback, finished_callback=self._finished)
            self._stream.start()
        except Exception as exc:  # PortAudioError, ValueError
            if self._stream is not None:
                try:
                    self._stream.close()
                except Exception:
                    pass
                self._stream = None
            raise AudioDeviceError(
                f"cannot open {self._describe()}: {exc}. The device may be busy (another program "
                "holds it), unplugged, or refuse this format; pick another with --input-device "
                "(see --list-devices)") from None

    def _read_raw(self, timeout_s: float) -> np.ndarray | None:
        return self._ring.read(self._read_max, timeout_s, min_frames=self.block_frames)

    def _ring_counters(self) -> tuple[int, int, int]:
        return self._ring.dropped_blocks, self._ring.dropped_frames, self._overflows

    def _close(self) -> None:
        self._stopping = True
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.stop()
                stream.close()
            except Exception:
                pass
        self._ring.close()
