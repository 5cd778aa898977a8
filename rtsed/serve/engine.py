"""The streaming engine: samples in, sound events out, on one backend (torch or onnxruntime).

    mono float32 samples at the model's rate -> LogMelStream -> pending frames
    -> every ``frames_per_step`` frames: one model step (state kept by the backend)
    -> probabilities of the completed output frames -> EventDecoder -> onset notices, SoundEvents

One engine serves one stream (the live tool, file detection); ``MultiStreamEngine`` steps many
independent streams in one batched model call (serving many microphones from one machine).
Both backends implement the ``Stepper`` protocol (rtsed.serve.steppers), so neither engine knows
which one runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from rtsed.audio.frontend import LogMelStream
from rtsed.config import DetectorConfig
from rtsed.serve.decode import EventDecoder, OnsetNotice, SoundEvent
from rtsed.serve.steppers import OnnxStepper, Stepper, TorchStepper, exported_step_graph, make_stepper

__all__ = ["DetectionEngine", "EngineStats", "MultiStreamEngine", "OnnxStepper", "Stepper", "TorchStepper",
           "exported_step_graph", "make_stepper"]


# -------------------------------------------------------------------------------- one stream


@dataclass
class EngineStats:
    """Counters for the terminal view and the report (compute measured around model steps)."""

    frames: int = 0  # output frames produced
    steps: int = 0
    compute_s: float = 0.0  # front end + model + decoder
    # MultiStreamEngine only: log-mel frames dropped from full queues (oldest first), and streams
    # ended for want of audio.
    dropped_frames: int = 0
    idle_ended: int = 0

    def compute_ms_per_hop(self) -> float:
        return 1000.0 * self.compute_s / self.frames if self.frames else float("nan")


class DetectionEngine:
    """One stream: push samples (any block size), get onset notices and finished SoundEvents.

    ``frames_per_step`` trades latency for throughput: the model runs once that many new frames
    are pending (each step has a fixed overhead that several frames share).
    """

    def __init__(self, stepper: Stepper, config: DetectorConfig, frames_per_step: int = 4,
                 decoder_overrides: dict | None = None, extra_latency_s: float = 0.0,
                 keep_probabilities: bool = False):
        if frames_per_step < 1:
            raise ValueError("frames_per_step must be >= 1")
        self.stepper = stepper
        self.config = config
        self.labels = config.labels
        self.hop_s = config.frontend.hop_s
        self.frames_per_step = frames_per_step
        self.logmel = LogMelStream(config.frontend)
        self.decoder = EventDecoder(config.labels, self.hop_s, config.decoder, decoder_overrides)
        self.pending: list[np.ndarray] = []
        self.pending_frames = 0
        # Audio held back until it completes the step's frames: the front end then runs once per
        # model step, not once per audio block (each front-end call carries torch's per-call
        # overhead; the frames come out at the same sample either way).
        self.pending_audio: list[np.ndarray] = []
        self.pending_samples = 0
        self.latest_probs = np.zeros(len(config.labels), np.float32)
        self.stats = EngineStats()
        self.extra_latency_s = extra_latency_s
        self.finished = False
        # Offline detection keeps every frame's probabilities (for plots and JSON); live does not.
        self.keep_probabilities = keep_probabilities
        self.kept: list[np.ndarray] = []
        self.kept_logmel: list[np.ndarray] = []

    @property
    def lookahead_frames(self) -> int:
        return self.stepper.lookahead_frames

    @property
    def algorithmic_latency_s(self) -> float:
        """Window + lookahead + buffering of frames_per_step - 1 hops + the decoder's median
        smoother delay (its worst class) + resampler delay: when the last sample a decision about
        a sound needs has arrived. Minimum event durations add to when an onset is *reported*
        (``decoder.decision_delay_frames``), not to when it can first be known."""
        fe = self.config.frontend
        smoother = max(self.decoder.delay_frames)
        return (fe.window_s + (self.lookahead_frames + smoother + self.frames_per_step - 1) * self.hop_s
                + self.extra_latency_s)

    def push_audio(self, samples: np.ndarray) -> list[OnsetNotice | SoundEvent]:
        if self.finished:
            raise RuntimeError("this stream was flushed: call reset() before pushing more audio")
        started = time.perf_counter()
        samples = np.asarray(samples)
        if samples.ndim != 1 or samples.dtype.kind != "f" or not np.isfinite(samples).all():
            # Refused now, whole, with the front end's message (it raises before changing any
            # state), not later with the audio held back before it.
            self.logmel.push(samples)
        self.pending_audio.append(samples)
        self.pending_samples += samples.shape[0]
        if self.pending_frames + self.logmel.frames_after(self.pending_samples) < self.frames_per_step:
            self.stats.compute_s += time.perf_counter() - started
            return []
        out = self._push_pending_audio()
        self.stats.compute_s += time.perf_counter() - started
        return out

    def _push_pending_audio(self) -> list[OnsetNotice | SoundEvent]:
        """The held-back audio through the front end; the model runs once frames_per_step frames
        are pending."""
        audio = self.pending_audio[0] if len(self.pending_audio) == 1 else np.concatenate(self.pending_audio)
        self.pending_audio, self.pending_samples = [], 0
        frames = self.logmel.push(audio).numpy()
        out: list[OnsetNotice | SoundEvent] = []
        if self.keep_probabilities and frames.shape[0]:
            self.kept_logmel.append(frames)
        if frames.shape[0]:
            self.pending.append(frames)
            self.pending_frames += frames.shape[0]
            if self.pending_frames >= self.frames_per_step:
                out = self._run(np.concatenate(self.pending)[None])
                self.pending, self.pending_frames = [], 0
        return out

    def flush(self) -> list[OnsetNotice | SoundEvent]:
        """End of stream: run pending frames, then the lookahead padding; close open events."""
        started = time.perf_counter()
        out: list[OnsetNotice | SoundEvent] = []
        if self.pending_samples:
            out += self._push_pending_audio()
        if self.pending_frames:
            out += self._run(np.concatenate(self.pending)[None])
            self.pending, self.pending_frames = [], 0
        self.stepper.end()
        remaining = self.stepper.pending_after_end()
        if remaining:
            out += self._run(np.zeros((1, remaining, self.config.model.n_mels), np.float32))
        out += self.decoder.flush()
        self.finished = True
        self.stats.compute_s += time.perf_counter() - started
        return out

    def reset(self) -> None:
        self.logmel.reset()
        self.stepper.reset()
        self.decoder.reset()
        self.pending, self.pending_frames = [], 0
        self.pending_audio, self.pending_samples = [], 0
        self.finished = False
        self.kept, self.kept_logmel = [], []

    def probabilities(self) -> np.ndarray:
        """(T, C) probabilities of every output frame so far (keep_probabilities=True)."""
        return np.concatenate(self.kept) if self.kept else np.zeros((0, len(self.labels)), np.float32)

    def logmel_frames(self) -> np.ndarray:
        """(T, F) raw log-mel frames so far (keep_probabilities=True), for plots."""
        return np.concatenate(self.kept_logmel) if self.kept_logmel else np.zeros((0, self.config.model.n_mels), np.float32)

    def _run(self, logmel: np.ndarray) -> list[OnsetNotice | SoundEvent]:
        probs, _, valid = self.stepper.step(logmel)
        rows = probs[0][valid[0]]
        self.stats.steps += 1
        if rows.shape[0] == 0:
            return []
        self.stats.frames += rows.shape[0]
        self.latest_probs = rows[-1]
        if self.keep_probabilities:
            self.kept.append(rows)
        return self.decoder.push(rows)


# ------------------------------------------------------------------------------- many streams


class MultiStreamEngine:
    """N independent streams stepped in one batched model call (frames in, events out).

    Each slot has its own front end and decoder; ``start``/``end``/``stop``/``reset`` act on one
    slot. ``push_audio(slot, samples)`` queues the slot's log-mel frames; ``step()`` runs the
    model once for every slot that can step and returns per-slot events. A slot can step when it
    has ``frames_per_step`` frames queued, or when it is ending. Slots without a step's frames
    sit the step out (the stepper holds their state, ``Stepper.step(hold=...)``): a stalled
    stream never holds the others back. Idle slots ride along with zero frames; their outputs are
    ignored and a slot starts fresh.

    ``end(slot)`` completes a stream exactly as ``DetectionEngine.flush`` does: its queued
    frames, then the lookahead's padding, then the decoder's flush, over the next steps; the slot
    is free (``active[slot]`` false) after the step that returns its last events.

    Two bounds keep one stream from costing the others:

    - ``idle_timeout_s`` (wall seconds, ``clock``): a started stream that has been pushed no audio
      for this long is stalled; ``step()`` ends it (``end_idle``), so its queued frames are
      stepped, its open events closed and returned with its last step, and its slot freed.
      ``timed_out[slot]`` says it ended that way. Wall time, not stream time: a stalled stream
      is one whose audio stopped coming, whatever the others do. None: streams never time out;
      ``start(slot, never_idle=True)``: that stream never does (a source that reconnects).
    - ``max_queue_s`` (seconds of audio): a stream's queue of frames waiting for a step holds at
      most this much. Beyond it the **oldest** frames are dropped (the stream stays as close to
      real time as it can; later audio moves earlier on its timeline by what was dropped),
      counted per slot in ``dropped_frames`` and in ``stats.dropped_frames``. None: unbounded.
    """

    def __init__(self, stepper: Stepper, config: DetectorConfig, frames_per_step: int = 16,
                 idle_timeout_s: float | None = None, max_queue_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if frames_per_step < 1:
            raise ValueError("frames_per_step must be >= 1")
        if idle_timeout_s is not None and not idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s must be > 0 seconds (or None: never), got {idle_timeout_s}")
        hop_s = config.frontend.hop_s
        if max_queue_s is not None and not max_queue_s >= frames_per_step * hop_s:
            raise ValueError(f"max_queue_s must hold at least one step ({frames_per_step * hop_s:g} s), "
                             f"got {max_queue_s}")
        self.idle_timeout_s = idle_timeout_s
        self.max_queue_s = max_queue_s
        # A queue of max_queue_s holds this many frames (one step at least, so a stream can run).
        self.max_queue_frames = None if max_queue_s is None else max(frames_per_step, int(max_queue_s / hop_s))
        self.clock = clock
        self.stepper, self.config = stepper, config
        self.n = stepper.batch_size
        self.frames_per_step = frames_per_step
        self.active = np.zeros(self.n, bool)
        self.ending = np.zeros(self.n, bool)  # end() called: completing over the next steps
        self._ended = np.zeros(self.n, bool)  # the stepper has been told (all real frames stepped)
        self.logmel = [LogMelStream(config.frontend) for _ in range(self.n)]
        self.decoders = [EventDecoder(config.labels, config.frontend.hop_s, config.decoder) for _ in range(self.n)]
        self.queues: list[list[np.ndarray]] = [[] for _ in range(self.n)]
        self.queued = np.zeros(self.n, np.int64)
        # (N, C): each slot's probabilities of its latest valid output frame (for displays).
        self.latest_probs = np.zeros((self.n, len(config.labels)), np.float32)
        # {slot: (m, C) probabilities of the valid output frames of the last step}, for displays.
        self.last_rows: dict[int, np.ndarray] = {}
        self.stats = EngineStats()
        self.last_audio_at = np.zeros(self.n, np.float64)  # clock() when each slot last got audio
        self.timed_out = np.zeros(self.n, bool)  # ended by end_idle (kept until the slot restarts)
        self.never_idle = np.zeros(self.n, bool)  # slots exempt from idle_timeout_s
        self.dropped_frames = np.zeros(self.n, np.int64)  # per slot, since its start
        self.skip_frames = np.zeros(self.n, np.int64)  # output frames still to compute but not decode (start)

    def start(self, slot: int, decoder_overrides: dict | None = None, decoder_state: dict | None = None,
              skip_frames: int = 0, never_idle: bool = False) -> None:
        """Start a stream in a free slot; ``decoder_overrides`` as ``EventDecoder``'s
        (``{label: on}`` or ``{label: (on, off)}``), for this stream only. ``never_idle``: the
        stream is not ended for want of audio (its source paces itself and may be silent while
        it reconnects); it ends only through ``end``.

        Resuming a stream elsewhere (rtsed.cluster): its audio is fed again from a hop boundary
        some frames before where it left off, ``skip_frames`` output frames are computed (they
        refill the model's state, which a finite receptive field bounds) but not decoded, and
        the decoder continues from ``decoder_state`` (``EventDecoder.snapshot``)."""
        if skip_frames < 0:
            raise ValueError(f"skip_frames must be >= 0, got {skip_frames}")
        self.reset(slot)
        self.never_idle[slot] = never_idle
        if decoder_overrides:
            self.decoders[slot] = EventDecoder(self.config.labels, self.config.frontend.hop_s, self.config.decoder,
                                               decoder_overrides)
        if decoder_state is not None:
            self.decoders[slot].restore(decoder_state)
        self.skip_frames[slot] = skip_frames
        self.active[slot] = True
        self.last_audio_at[slot] = self.clock()

    def end(self, slot: int) -> None:
        """End a stream: it completes over the next steps (see the class docstring). Audio
        still held back by the front end (less than a hop) is dropped, as offline."""
        if not self.active[slot]:
            raise RuntimeError(f"slot {slot} is not started")
        self.ending[slot] = True

    def stop(self, slot: int) -> list[SoundEvent]:
        """Deactivate a slot at once, closing its open events (its queued and lookahead frames
        are dropped: ``end`` completes a stream instead)."""
        self.active[slot] = self.ending[slot] = False
        return [e for e in self.decoders[slot].flush() if isinstance(e, SoundEvent)]

    def reset(self, slot: int) -> None:
        self.stepper.reset([slot])
        self.logmel[slot].reset()
        self.decoders[slot] = EventDecoder(self.config.labels, self.config.frontend.hop_s, self.config.decoder)
        self.queues[slot], self.queued[slot] = [], 0
        self.active[slot] = self.ending[slot] = self._ended[slot] = False
        self.latest_probs[slot] = 0.0
        self.timed_out[slot] = False
        self.dropped_frames[slot] = 0
        self.skip_frames[slot] = 0

    def push_audio(self, slot: int, samples: np.ndarray) -> np.ndarray:
        """Queue a slot's mono samples at the model's rate -> the (n, F) raw log-mel frames they
        completed (for displays; n may be 0)."""
        if not self.active[slot]:
            raise RuntimeError(f"slot {slot} is not started")
        if self.ending[slot]:
            raise RuntimeError(f"slot {slot} is ending: no more audio")
        frames = self.logmel[slot].push(samples).numpy()
        if np.shape(samples)[0]:
            self.last_audio_at[slot] = self.clock()
        if frames.shape[0]:
            self.queues[slot].append(frames)
            self.queued[slot] += frames.shape[0]
            if self.max_queue_frames is not None and self.queued[slot] > self.max_queue_frames:
                self._drop_oldest(slot, int(self.queued[slot]) - self.max_queue_frames)
        return frames

    def _drop_oldest(self, slot: int, n: int) -> None:
        queue = np.concatenate(self.queues[slot])[n:]
        self.queues[slot] = [queue]
        self.queued[slot] = queue.shape[0]
        self.dropped_frames[slot] += n
        self.stats.dropped_frames += n

    def idle_slots(self, now: float | None = None) -> np.ndarray:
        """(N,) bool: running streams (started, not ending) without audio for idle_timeout_s."""
        if self.idle_timeout_s is None:
            return np.zeros(self.n, bool)
        now = self.clock() if now is None else now
        return self.active & ~self.ending & ~self.never_idle & (now - self.last_audio_at >= self.idle_timeout_s)

    def end_idle(self, now: float | None = None) -> list[int]:
        """End every stalled stream (``idle_slots``) -> their slots. Each completes over the next
        steps like ``end``: queued frames, lookahead padding, then its open events closed."""
        slots = [int(s) for s in np.flatnonzero(self.idle_slots(now))]
        for slot in slots:
            self.end(slot)
            self.timed_out[slot] = True
            self.stats.idle_ended += 1
        return slots

    def runnable(self) -> np.ndarray:
        """(N,) bool: the slots that would take part in the next step."""
        return self.active & ((self.queued >= self.frames_per_step) | self.ending)

    def ready(self) -> bool:
        """Whether some slot can step (a stalled stream past idle_timeout_s can: it ends)."""
        return bool(self.runnable().any() or self.idle_slots().any())

    def step(self) -> dict[int, list[OnsetNotice | SoundEvent]]:
        """One batched model call for the slots that can step -> {slot: its onset notices and
        finished events}; {} when none can. A slot that completed its ``end`` in this step is
        inactive afterwards and its last events are in the result. Stalled streams are ended
        first (``end_idle``)."""
        self.end_idle()
        run = self.runnable()
        if not run.any():
            return {}
        started = time.perf_counter()
        n = self.frames_per_step
        # An ending slot's last real frames may be fewer than a step: the step shrinks to them
        # (steps of any length are exact), so they are stepped before the stepper is told the end.
        tails = self.queued[run & self.ending & (self.queued > 0) & (self.queued < n)]
        if tails.size:
            n = int(tails.min())
        for slot in np.flatnonzero(run & self.ending & (self.queued == 0) & ~self._ended):
            self.stepper.end([int(slot)])
            self._ended[slot] = True
        f = self.config.model.n_mels
        batch = np.zeros((self.n, n, f), np.float32)
        for slot in np.flatnonzero(run & (self.queued > 0)):
            queue = self.queues[slot][0] if len(self.queues[slot]) == 1 else np.concatenate(self.queues[slot])
            batch[slot] = queue[:n]
            rest = queue[n:]
            self.queues[slot] = [rest] if rest.shape[0] else []
            self.queued[slot] = rest.shape[0]
        hold = self.active & ~run
        probs, _, valid = self.stepper.step(batch, hold) if hold.any() else self.stepper.step(batch)
        out: dict[int, list[OnsetNotice | SoundEvent]] = {}
        self.last_rows = {}
        for slot in np.flatnonzero(run):
            rows = probs[slot][valid[slot]]
            if self.skip_frames[slot] and rows.shape[0]:
                skipped = min(int(self.skip_frames[slot]), rows.shape[0])
                rows = rows[skipped:]
                self.skip_frames[slot] -= skipped
            items: list[OnsetNotice | SoundEvent] = []
            if rows.shape[0]:
                self.last_rows[int(slot)] = rows
                self.latest_probs[slot] = rows[-1]
                self.stats.frames += rows.shape[0]
                items = self.decoders[slot].push(rows)
            if self._ended[slot] and self.stepper.pending_after_end(int(slot)) <= 0:
                items += self.decoders[slot].flush()
                self.active[slot] = self.ending[slot] = self._ended[slot] = False
            if items or not self.active[slot]:
                out[int(slot)] = items
        self.stats.steps += 1
        self.stats.compute_s += time.perf_counter() - started
        return out
