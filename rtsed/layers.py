"""The paper's layers, each with one offline forward and one streaming step that share their arithmetic.

Tensor layout follows the paper's code: (B, C, T, F) with time on axis 2 and frequency on axis 3.

Streaming (DESIGN.md's streaming contract): every layer that looks across time keeps the past
input frames it still needs in a small state object allocated once by ``init_state`` and updated in
place by ``step``. A "same"-padded time convolution is run as a causal one; its output is the
offline output delayed by the right padding, and the caller (``rtsed.streaming.ModelStream``)
handles that delay by masking frames that fall outside the stream. The layers here know nothing of
stream positions: they only turn new input frames into the same number of new output frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtsed import ops


# ----------------------------------------------------------------------------------------------
# Frequency blocks: f_cnn and f_dws
# ----------------------------------------------------------------------------------------------


@dataclass
class ConvHistory:
    """The last ``K - 1`` input frames of a K-tap time convolution: (B, C_in, K - 1, F).

    Zeros at the start of a stream are exactly the left zero padding of the offline convolution.
    Kept by concatenation rather than a ring: K - 1 = 4 frames is a constant, and the
    concatenated window feeds one stock conv2d call.
    """

    frames: Tensor

    def reset(self, streams: Tensor | None = None) -> None:
        if streams is None:
            self.frames.zero_()
        else:
            self.frames[streams] = 0


class FrequencyBlock(nn.Module):
    """One CNN block: time-frequency conv (K x K) -> ReLU -> BatchNorm -> max-pool over frequency
    (1, P) -> Dropout2d. Subclasses define the conv part (``conv_valid_time``); ``valid_time``
    runs the whole block on time-padded input, and is what a fused kernel replaces.

    x: (B, C_in, T, F) -> (B, C_out, T, F // P). Frequency is zero-padded by K // 2 on each side;
    time by ``K - 1 - right_pad`` on the left and ``right_pad`` on the right (K // 2 on each side
    for "same", K - 1 on the left for "causal").
    """

    def __init__(self, c_out: int, kernel: int, pool: int, dropout: float, right_pad: int):
        super().__init__()
        if not 0 <= right_pad <= kernel - 1:
            raise ValueError(f"right_pad {right_pad} outside [0, {kernel - 1}]")
        self.kernel = kernel
        self.context_frames = kernel - 1
        self.right_pad = right_pad
        self.bn = nn.BatchNorm2d(c_out)
        self.pool = nn.MaxPool2d(kernel_size=(1, pool), stride=(1, pool))
        self.dropout = nn.Dropout2d(dropout)

    def conv_valid_time(self, x: Tensor) -> Tensor:
        """(B, C_in, T + K - 1, F) -> (B, C_out, T, F): the convolution part, no time padding."""
        raise NotImplementedError

    def post(self, y: Tensor) -> Tensor:
        """ReLU -> BN -> pool -> dropout, per frame (the paper's order: ReLU before BN)."""
        return self.dropout(self.pool(self.bn(F.relu(y))))

    def valid_time(self, x: Tensor) -> Tensor:
        """(B, C_in, T + K - 1, F) time-padded input -> (B, C_out, T, F // P): the whole block."""
        return self.post(self.conv_valid_time(x))

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 0, self.context_frames - self.right_pad, self.right_pad))
        return self.valid_time(x)

    def init_state(self, batch_size: int, n_freq: int, device, dtype) -> ConvHistory:
        c_in = self.in_channels
        return ConvHistory(torch.zeros(batch_size, c_in, self.context_frames, n_freq, device=device, dtype=dtype))

    def step(self, x: Tensor, state: ConvHistory) -> Tensor:
        """x: (B, C_in, n, F) new frames -> (B, C_out, n, F // P), the causal outputs for them
        (offline frame t - right_pad for input frame t)."""
        window = torch.cat([state.frames, x], dim=2)
        if self.context_frames:
            state.frames.copy_(window[:, :, window.shape[2] - self.context_frames:])
        return self.valid_time(window)


class ConvBlock(FrequencyBlock):
    """f_cnn block: Conv2d(C_in -> C_out, K x K, bias) -> ReLU -> BN -> pool -> Dropout2d."""

    def __init__(self, c_in: int, c_out: int, kernel: int, pool: int, dropout: float, right_pad: int):
        super().__init__(c_out, kernel, pool, dropout, right_pad)
        self.in_channels = c_in
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=(0, kernel // 2))

    def conv_valid_time(self, x: Tensor) -> Tensor:
        return self.conv(x)


class DWSBlock(FrequencyBlock):
    """f_dws block: depthwise Conv2d(C_in -> C_out, K x K, groups=C_in) -> LeakyReLU(0.01) -> BN
    -> pointwise Conv2d(C_out -> C_out, 1 x 1) -> ReLU -> BN -> pool -> Dropout2d.

    With C_in = 1 (block 1) the "depthwise" conv is a plain 1 -> C_out conv (depth multiplier
    C_out). The inner LeakyReLU + BN is in the authors' code, not the paper's text (REFERENCE.md).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, pool: int, dropout: float, right_pad: int):
        super().__init__(c_out, kernel, pool, dropout, right_pad)
        self.in_channels = c_in
        self.depthwise = nn.Conv2d(c_in, c_out, kernel, padding=(0, kernel // 2), groups=c_in)
        self.inner_bn = nn.BatchNorm2d(c_out)
        self.pointwise = nn.Conv2d(c_out, c_out, 1)

    def conv_valid_time(self, x: Tensor) -> Tensor:
        return self.pointwise(self.inner_bn(F.leaky_relu(self.depthwise(x), 0.01)))

    def valid_time(self, x: Tensor) -> Tensor:
        # The fused DWS kernel (rtsed.ops) replaces the whole block; the reference is the
        # composition of stock torch ops above.
        return ops.dws_block(self, x)


# ----------------------------------------------------------------------------------------------
# Temporal parts: f_dil and the GRU
# ----------------------------------------------------------------------------------------------


@dataclass
class FrameRing:
    """Past input frames of f_dil in a ring buffer: (B, capacity, C) plus a write position.

    capacity = (K - 1) * d + max_step_frames, so writing a step's new frames never overwrites a
    frame that one of them still reads. The write position is shared by all streams of a batch
    (they advance together); a stream is reset by zeroing its rows, which is exactly the zero left
    padding of the offline convolution. Frames are written in place, never shifted: a step costs
    O(new frames), whatever the dilation (d = 100 keeps 600 frames).
    """

    frames: Tensor
    write_pos: int = 0

    def reset(self, streams: Tensor | None = None) -> None:
        if streams is None:
            self.frames.zero_()
        else:
            self.frames[streams] = 0


class DilatedTemporal(nn.Module):
    """f_dil: the CNN output (B, C, T, 1) is read as a one-channel image (B, 1, T, C) whose width
    is the C CNN channels; Conv2d(1 -> C_out, (K, K), stride (1, S), dilation (d, 1)) -> ReLU -> BN;
    then (B, C_out, T, W) is permuted to (B, T, C_out, W) and flattened channel-major to
    (B, T, C_out * W) for the per-frame classifier. W = floor((C - K) / S) + 1; no padding over C.
    Time padding: d (K - 1) / 2 each side ("same") or d (K - 1) on the left ("causal").
    """

    def __init__(self, channels: int, kernel: int, dilation: int, stride: int, right_pad: int):
        super().__init__()
        self.kernel, self.dilation, self.stride = kernel, dilation, stride
        self.context_frames = (kernel - 1) * dilation
        if not 0 <= right_pad <= self.context_frames:
            raise ValueError(f"right_pad {right_pad} outside [0, {self.context_frames}]")
        self.right_pad = right_pad
        self.channels = channels
        self.width = (channels - kernel) // stride + 1
        self.conv = nn.Conv2d(1, channels, (kernel, kernel), stride=(1, stride), dilation=(dilation, 1))
        self.bn = nn.BatchNorm2d(channels)

    @property
    def out_features(self) -> int:
        return self.conv.out_channels * self.width

    def forward(self, h: Tensor) -> Tensor:
        """h: (B, C, T, 1) -> (B, T, C_out * W)."""
        x = h.permute(0, 3, 2, 1)  # (B, 1, T, C): CNN channels become the width axis
        x = F.pad(x, (0, 0, self.context_frames - self.right_pad, self.right_pad))
        return self._flatten(ops.dilated_temporal(self, x))

    def conv_relu_bn(self, x: Tensor) -> Tensor:
        """Reference: (B, 1, T + (K - 1) d, C) time-padded -> (B, C_out, T, W), conv -> ReLU -> BN."""
        y = F.conv2d(x, self.conv.weight, self.conv.bias, stride=(1, self.stride), dilation=(self.dilation, 1))
        return self.bn(F.relu(y))

    @staticmethod
    def _flatten(y: Tensor) -> Tensor:
        """(B, C_out, T, W) -> (B, T, C_out * W), channel-major (index c * W + w) as in the paper."""
        b, c, t, w = y.shape
        return y.permute(0, 2, 1, 3).reshape(b, t, c * w)

    def init_state(self, batch_size: int, max_step_frames: int, device, dtype) -> FrameRing:
        capacity = self.context_frames + max_step_frames
        return FrameRing(torch.zeros(batch_size, capacity, self.channels, device=device, dtype=dtype))

    def step(self, h: Tensor, state: FrameRing) -> Tensor:
        """h: (B, C, n, 1) new CNN frames -> (B, n, C_out * W), the causal outputs for them.
        n may exceed the ring's step capacity; the step is then done in slices."""
        frames = h[..., 0].transpose(1, 2)  # (B, n, C)
        capacity = state.frames.shape[1]
        max_step = capacity - self.context_frames
        outputs = [ops.dilated_step(self, frames[:, i:i + max_step], state)
                   for i in range(0, frames.shape[1], max_step)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def step_slice_ref(self, frames: Tensor, state: FrameRing) -> Tensor:
        """Reference ring step: frames (B, n, C) with n <= capacity - (K - 1) d -> (B, n, C_out * W)."""
        b, n, c = frames.shape
        capacity = state.frames.shape[1]
        device = frames.device
        new_slots = (state.write_pos + torch.arange(n, device=device)) % capacity
        state.frames[:, new_slots] = frames
        # Tap k of output j reads the frame (K - 1 - k) * d steps before input frame j.
        offsets = (torch.arange(self.kernel, device=device) - (self.kernel - 1)) * self.dilation
        tap_slots = (state.write_pos + torch.arange(n, device=device)[:, None] + offsets[None, :]) % capacity
        state.write_pos = (state.write_pos + n) % capacity
        taps = state.frames[:, tap_slots.reshape(-1)].reshape(b * n, 1, self.kernel, c)
        # The gathered taps are already spaced by d, so the conv runs undilated over them.
        y = F.conv2d(taps, self.conv.weight, self.conv.bias, stride=(1, self.stride))  # (B*n, C_out, 1, W)
        y = self.bn(F.relu(y))
        return y.reshape(b, n, -1)  # (B*n, C_out, 1, W) is already channel-major per frame


@dataclass
class GRUHidden:
    """The GRU's hidden state h: (1, B, H). Zero at the start of a stream (the paper's h0 = 0)."""

    h: Tensor

    def reset(self, streams: Tensor | None = None) -> None:
        if streams is None:
            self.h.zero_()
        else:
            self.h[:, streams] = 0


class GRUTemporal(nn.Module):
    """Unidirectional one-layer GRU over frames: (B, C, T, 1) -> (B, T, H). Causal by nature."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.gru = nn.GRU(channels, hidden, batch_first=True)
        self.right_pad = 0
        self.context_frames = 0

    @property
    def out_features(self) -> int:
        return self.gru.hidden_size

    def forward(self, h: Tensor) -> Tensor:
        out, _ = self.gru(h[..., 0].transpose(1, 2))
        return out

    def init_state(self, batch_size: int, max_step_frames: int, device, dtype) -> GRUHidden:
        return GRUHidden(torch.zeros(1, batch_size, self.gru.hidden_size, device=device, dtype=dtype))

    def step(self, h: Tensor, state: GRUHidden, skip: Tensor | None = None) -> Tensor:
        """h: (B, C, n, 1) -> (B, n, H). skip: (B,) int64, leading frames of each stream that lie
        before its first real frame (the CNN's warm-up under "same" padding); they leave the
        hidden state untouched and their outputs are meaningless. None: skip nothing."""
        out, new_h = self.step_tensors(h[..., 0].transpose(1, 2), state.h, skip)
        state.h.copy_(new_h)
        return out

    def step_tensors(self, x: Tensor, h: Tensor, skip: Tensor | None) -> tuple[Tensor, Tensor]:
        """Functional step: x (B, n, C), h (1, B, H), skip (B,) -> (out (B, n, H), new h).

        Skipped frames are always a stream's leading frames, and a stream in warm-up still has
        h = 0. So instead of a per-frame loop with masked updates, each stream's sequence is
        shifted left by its skip count (one gather), run through one GRU call, and shifted back;
        the new h is the output at the stream's last real frame. Only tensor ops: the same code
        exports to ONNX with dynamic frames per step."""
        if skip is None:
            return self.gru(x, h)
        n, hidden = x.shape[1], self.gru.hidden_size
        t = torch.arange(n, device=x.device)
        skip = skip.to(x.device)
        src = torch.clamp(t[None, :] + skip[:, None], max=n - 1)  # (B, n)
        shifted = torch.gather(x, 1, src[..., None].expand(-1, -1, x.shape[2]))
        out_shifted, _ = self.gru(shifted, h)
        back = torch.clamp(t[None, :] - skip[:, None], min=0)
        out = torch.gather(out_shifted, 1, back[..., None].expand(-1, -1, hidden))
        last = torch.clamp(n - 1 - skip, min=0).view(-1, 1, 1).expand(-1, 1, hidden)
        h_last = torch.gather(out_shifted, 1, last).transpose(0, 1)  # (1, B, H)
        return out, torch.where((skip >= n).view(1, -1, 1), h, h_last)
