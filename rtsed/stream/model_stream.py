"""Streaming inference of an SEDModel over B independent streams, with explicit per-layer state.

How "same" padding streams (the streaming contract, docs/streaming.md): each time convolution runs causally,
so its output for input position i is the offline output at time i - right_pad. Position i of
the stream after layer k therefore holds time ``i - D_k``, with D_k the cumulative right padding
up to layer k (2, 4, 6 for the paper's CNN blocks; 36 after f_dil for dnd_7_10). Offline, every
convolution sees zeros outside [0, T); streaming reproduces that by zeroing, after each layer,
every position whose time lies before the stream's start or, once the stream is ended, at or after
its last frame. ``flush`` then pushes ``lookahead`` placeholder frames through the pipeline: they
are masked to zero at the input and at every layer, exactly the zeros offline padding would feed.
Causal models have D_k = 0 and nothing to mask after the start.

Per step the work is O(new frames): CNN blocks keep 4 past input frames, f_dil a ring buffer of
(K - 1) d frames read by index, the GRU its hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rtsed.backends import dispatch
from rtsed.models.layers import ConvHistory
from rtsed.models.model import SEDModel
from rtsed.backends.precision import autocast, check_precision
from rtsed.stream.plan import NO_END, StreamPlan


@dataclass
class StepOutput:
    """One batched step. logits: (B, n, C); frame_index: (B, n) int64, the offline frame each
    row belongs to (may be negative or past the end); valid: (B, n) bool, rows that are real
    output frames of their stream."""

    logits: Tensor
    frame_index: Tensor
    valid: Tensor


def _require_eval(model: SEDModel) -> None:
    if model.training:
        raise RuntimeError(
            "streaming runs in eval mode only (BatchNorm running statistics, no dropout): "
            "call model.eval() first"
        )


class ModelStream:
    """Steps ``batch_size`` independent streams of one model in batched calls.

    Streams share one call but not their state: each has its own position, can be ended
    (``end``/``flush``) and ``reset`` on its own. Runs in eval mode only (BatchNorm with running
    statistics, dropout off): a model in training mode is rejected.

    ``max_step_frames`` sizes f_dil's ring buffer; longer steps are split internally.
    ``precision`` "bf16" runs the step's GEMMs in bf16 (``rtsed.backends.precision``; CPU only).
    """

    def __init__(self, model: SEDModel, batch_size: int = 1, max_step_frames: int = 64, precision: str = "fp32"):
        _require_eval(model)
        if batch_size < 1 or max_step_frames < 1:
            raise ValueError("batch_size and max_step_frames must be >= 1")
        self.precision = precision
        self.model = model
        self.batch_size = batch_size
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        self.n_mels = model.config.n_mels
        freq = model.config.n_mels
        self.block_states: list[ConvHistory] = []
        for block in model.blocks:
            self.block_states.append(block.init_state(batch_size, freq, device, dtype))
            freq //= block.pool.kernel_size[1]
        self.temporal_state = model.temporal.init_state(
            batch_size, max_step_frames, device, dtype)
        self.plan = StreamPlan.of(model)
        self.block_delays = self.plan.block_delays
        self.lookahead_frames = self.plan.lookahead
        # Positions and ends are bookkeeping on the CPU, whatever the compute device.
        self.positions = torch.zeros(batch_size, dtype=torch.int64)
        self.ends = torch.full((batch_size,), NO_END, dtype=torch.int64)
        # True once every stream is past its lookahead and none has ended (positions only grow;
        # reset and end clear it): steps then skip the masking and its bookkeeping, ~20 tensor
        # ops that cost 10 % of a 16-frame dnd_7_10 step at one thread.
        self._steady = False
        self.device = device
        check_precision(precision, device.type, what="ModelStream precision")
        dispatch.prepare(device)

    # -- stream control ------------------------------------------------------------------------

    def reset(self, streams: Tensor | list[int] | None = None) -> None:
        """Start the given streams (default: all) afresh at frame 0; the others are untouched."""
        idx = None if streams is None else torch.as_tensor(streams, dtype=torch.long)
        self._steady = False
        for state in self.block_states:
            state.reset(None if idx is None else idx.to(self.device))
        self.temporal_state.reset(None if idx is None else idx.to(self.device))
        if idx is None:
            self.positions.zero_()
            self.ends.fill_(NO_END)
        else:
            self.positions[idx] = 0
            self.ends[idx] = NO_END

    def end(self, streams: Tensor | list[int] | None = None) -> None:
        """Mark the given streams (default: all) as ended at their current position: from now on
        their input frames are ignored and treated as the offline zero padding. Their last
        ``lookahead_frames`` outputs come out over the next steps (or at once with ``flush``)."""
        idx = slice(None) if streams is None else torch.as_tensor(streams, dtype=torch.long)
        self._steady = False
        self.ends[idx] = torch.minimum(self.ends[idx], self.positions[idx])

    # -- stepping ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, x: Tensor, hold=None) -> StepOutput:
        """x: (B, n, F) new normalised log-mel frames, one row per stream -> StepOutput with n rows
        per stream (the first ``lookahead_frames`` of a stream are not yet valid).

        hold: (B,) bool (tensor or array), streams that sit this step out: their state, position
        and end are as before the step, and their rows come back invalid (a batch is one call,
        so their rows are computed from whatever x holds and thrown away). A server steps the
        streams whose audio has arrived without waiting for the others."""
        held = held_streams(hold)
        saved = self._save(held) if held is not None else None
        first = self.positions.clone()
        logits = self._step_logits(x)
        frame_index = self.plan.frame_index(first, torch.arange(x.shape[1]))  # (B, n), CPU
        valid = self.plan.valid(frame_index, self.ends)
        if held is not None:
            self._restore(held, saved, x.shape[1])
            valid[held] = False
        return StepOutput(logits, frame_index, valid)

    def _save(self, held: Tensor) -> tuple:
        states = [*self.block_states, self.temporal_state]
        for state in states:
            if not (hasattr(state, "save") and hasattr(state, "restore")):
                raise RuntimeError(
                    f"{type(state).__name__} has no save()/restore(): holding streams out of a step needs "
                    "them (see rtsed.models.layers.FrameRing); step every stream, or add them to the state")
        dev = held.to(self.device)
        return [s.save(dev) for s in states], self.positions[held].clone(), self.ends[held].clone()

    def _restore(self, held: Tensor, saved: tuple, stepped_frames: int) -> None:
        states, positions, ends = saved
        dev = held.to(self.device)
        for state, value in zip([*self.block_states, self.temporal_state], states):
            state.restore(dev, value, stepped_frames)
        self.positions[held] = positions
        self.ends[held] = ends
        # The steady flag stays true: it was decided on the positions before the step, which
        # the held streams are back at and the others have grown from.

    def _step_logits(self, x: Tensor) -> Tensor:
        """The model part of ``step``: x (B, n, F) -> logits (B, n, C); advances the positions."""
        # Checked per step too: a model put back in training mode would use batch statistics
        # (and overwrite its BatchNorm running statistics) without any error.
        _require_eval(self.model)
        if x.dim() != 3 or x.shape[0] != self.batch_size or x.shape[2] != self.n_mels:
            raise ValueError(
                f"step expects (batch={self.batch_size}, frames, {self.n_mels}) frames; got {tuple(x.shape)}"
            )
        n = x.shape[1]
        # Masking is needed only while some stream is inside its first frames or has ended.
        masking = not self._steady and not self.plan.steady(self.positions, self.ends)
        self._steady = not masking
        with autocast(self.precision):
            logits = self._model_step(x, n, masking)
        self.positions += n
        return logits.to(x.dtype) if logits.dtype != x.dtype and x.is_floating_point() else logits

    def _model_step(self, x: Tensor, n: int, masking: bool) -> Tensor:
        """The model's arithmetic of a step (``_step_logits`` minus its checks and bookkeeping)."""
        h = x.to(self.device).unsqueeze(1)  # (B, 1, n, F)
        if masking:
            positions = self.positions[:, None] + torch.arange(n)  # (B, n), CPU
            ends = self.ends[:, None]

            def keep(delay: int) -> Tensor:
                return self.plan.keep(positions, ends, delay).to(self.device, h.dtype)[:, None, :, None]

            h = h * keep(0)
        for block, state, delay, masked in zip(self.model.blocks, self.block_states, self.block_delays,
                                               self.plan.masked_blocks):
            h = block.step(h, state)
            if masking and masked:
                h = h * keep(delay)
        temporal = self.model.temporal
        skip = torch.clamp(self.plan.cnn_delay - self.positions, 0, n) if masking and temporal.skips_warmup else None
        return temporal.step_logits(h, self.temporal_state, self.model.classifier, skip)

    # -- one-stream convenience ----------------------------------------------------------------

    @torch.no_grad()
    def push(self, frames: Tensor) -> Tensor:
        """One stream (batch_size 1): frames (n, F) -> logits (m, C) of the output frames
        completed by them, in order (m = n once the lookahead has filled)."""
        self._require_single()
        if frames.dim() == 2:
            frames = frames.unsqueeze(0)
        n = frames.shape[1]
        if n == 0:
            return frames.new_zeros(0, self.model.config.n_classes)
        if self._steady:  # every row valid
            return self._step_logits(frames)[0]
        lo, hi = self.plan.push_bounds(int(self.positions[0]), int(self.ends[0]), n)
        return self._step_logits(frames)[0, lo:hi]

    def flush(self) -> Tensor:
        """One stream: end it and return its last ``lookahead_frames`` logits (m, C), computed
        exactly as offline zero padding would. The stream must be ``reset`` before reuse."""
        self._require_single()
        self.end()
        pending = self.plan.pending_after_end(int(self.positions[0]), int(self.ends[0]))
        if pending <= 0:
            return torch.zeros(0, self.model.config.n_classes, device=self.device)
        return self.push(torch.zeros(pending, self.n_mels, device=self.device))

    def _require_single(self) -> None:
        if self.batch_size != 1:
            raise RuntimeError("push/flush serve one stream; with several use step/end/reset")


def held_streams(hold) -> Tensor | None:
    """hold: None or (B,) bool (tensor or array) -> the held streams' indices (int64, CPU), or
    None when none is held."""
    if hold is None:
        return None
    mask = torch.as_tensor(hold, dtype=torch.bool).cpu()
    if not bool(mask.any()):
        return None
    return mask.nonzero().flatten()


def stream_logits(model: SEDModel, frames: Tensor, chunk_sizes: list[int] | None = None) -> Tensor:
    """Run one stream of frames (T, F) through ModelStream in the given chunks (default: one
    chunk) and flush: (T, C) logits, to be compared with ``model(frames[None])[0]``."""
    stream = ModelStream(model)
    chunks = chunk_sizes or [frames.shape[0]]
    outs, start = [], 0
    for size in chunks:
        outs.append(stream.push(frames[start:start + size]))
        start += size
    if start < frames.shape[0]:
        outs.append(stream.push(frames[start:]))
    outs.append(stream.flush())
    return torch.cat(outs, dim=0)
