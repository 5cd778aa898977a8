"""The streaming arithmetic, written once: delays, lookahead, valid-frame masks, push bounds and
flush (docs/streaming.md). The torch stream (``ModelStream``), the ONNX step graph (``StepGraph``,
traced from these same functions) and the onnxruntime stream (``OnnxStream``, on numpy arrays)
all use it. The mask functions take torch tensors and numpy arrays alike.

Positions count the frames a stream has consumed; ``ends`` hold a stream's length once it has
been ended, ``NO_END`` while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

NO_END = 2**62  # ``ends`` value of a stream that has not been ended


@dataclass(frozen=True)
class StreamPlan:
    """A model's delays, in frames.

    block_delays[i]: cumulative right padding after CNN block i ("same" padding runs each time
    convolution causally, its output delayed by its right padding; masks use the CUMULATIVE delay).
    lookahead: the model's total delay, ``SEDModel.lookahead_frames``: output row j of a step
    that starts at position p is offline frame p + j - lookahead."""

    block_delays: tuple[int, ...]
    lookahead: int

    @classmethod
    def of(cls, model) -> "StreamPlan":
        delays, total = [], 0
        for block in model.blocks:
            total += block.right_pad
            delays.append(total)
        return cls(tuple(delays), model.lookahead_frames)

    @property
    def masked_blocks(self) -> tuple[bool, ...]:
        """Whether each block's output needs the keep mask in a masking step: where it is delayed
        (its warm-up frames lie before the stream's start), or where a later layer looks ahead
        (it would read the block's outputs past the stream's end)."""
        return tuple(delay > 0 or self.lookahead > delay for delay in self.block_delays)

    @property
    def cnn_delay(self) -> int:
        """The delay of the CNN's output, the temporal part's input."""
        return self.block_delays[-1] if self.block_delays else 0

    def steady(self, positions, ends) -> bool:
        """Whether every stream is past its lookahead and none has ended: every mask is then all
        ones and every output row valid, so a step may skip them."""
        return bool(positions.min() >= self.lookahead) and bool(ends.min() >= NO_END)

    def frame_index(self, first, rows):
        """first (B,) positions before a step, rows (n,) = 0..n-1 -> (B, n) the offline frame of
        each output row."""
        return first[:, None] + rows - self.lookahead

    @staticmethod
    def valid(frame_index, ends, steady: bool = False):
        """(B, n) whether each output row is a real frame: from frame 0 up to the stream's end.
        ``steady``: every frame_index is known to be >= 0 (one comparison fewer)."""
        if steady:
            return frame_index < ends[:, None]
        return (frame_index >= 0) & (frame_index < ends[:, None])

    @staticmethod
    def keep(input_positions, ends, delay: int):
        """input_positions (B, n) of a step's input frames, ends (B, 1) -> (B, n) whether the
        frames ``delay`` behind them lie inside the stream: outside, a layer's output must be the
        zeros of offline padding, whatever its causal computation gave."""
        t = input_positions - delay
        return (t >= 0) & (t < ends)

    def push_bounds(self, position: int, end: int, n: int) -> tuple[int, int]:
        """One stream at ``position`` stepping n frames: the rows [lo, hi) of the step's output
        that are real frames (from frame 0 up to the end)."""
        lo = min(n, max(0, self.lookahead - position))
        return lo, max(lo, min(n, end + self.lookahead - position))

    def pending_after_end(self, position: int, end: int) -> int:
        """Frames an ended stream still needs stepped (any values: they count as offline padding)
        before its last output frame comes out; ``flush`` feeds this many."""
        return max(0, int(end + self.lookahead - position))
