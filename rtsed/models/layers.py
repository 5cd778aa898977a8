"""The paper's layers, each with one offline forward and one streaming step that share their arithmetic.

Tensor layout follows the paper's code: (B, C, T, F) with time on axis 2 and frequency on axis 3.

Streaming (the streaming contract, docs/streaming.md): every layer that looks across time keeps the past
input frames it still needs in a small state object allocated once by ``init_state`` and updated in
place by ``step``. A "same"-padded time convolution is run as a causal one; its output is the
offline output delayed by the right padding, and the caller (``rtsed.stream.model_stream.ModelStream``)
handles that delay by masking frames that fall outside the stream. The layers here know nothing of
stream positions: they only turn new input frames into the same number of new output frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtsed import ops
from rtsed.backends.batchnorm import bn_arguments


# ----------------------------------------------------------------------------------------------
# Frequency blocks: f_cnn and f_dws
# ----------------------------------------------------------------------------------------------


def fold_cache(module: nn.Module) -> dict:
    """The module's cache of folded weights (a plain dict, handed to the ops it calls:
    rtsed.ops.fold.cached_fold)."""
    return module.__dict__.setdefault("_folded_cache", {})


@dataclass
class FrameState:
    """Past input frames a time convolution keeps between steps, one row per stream: ``frames``
    (B, ...). A zero row is a stream's start: exactly the offline convolution's left zero padding."""

    frames: Tensor

    def reset(self, streams: Tensor | None = None) -> None:
        if streams is None:
            self.frames.zero_()
        else:
            self.frames[streams] = 0

    def save(self, streams: Tensor) -> Tensor:
        """A copy of the given streams' rows, for ``restore`` after a step they sat out."""
        return self.frames[streams].clone()

    def restore(self, streams: Tensor, saved: Tensor, stepped_frames: int) -> None:
        self.frames[streams] = saved


@dataclass
class ConvHistory(FrameState):
    """The last ``K - 1`` input frames of a K-tap time convolution: frames (B, C_in, K - 1, F).

    Kept by concatenation rather than a ring: K - 1 = 4 frames is a constant, and the
    concatenated window feeds one stock conv2d call.
    """


class FrequencyBlock(nn.Module):
    """One CNN block: time-frequency conv (K x K) -> ReLU -> BatchNorm -> max-pool over frequency
    (1, P) -> Dropout2d. Subclasses hold the conv part's modules and run the block through their
    op in rtsed.ops.block (``valid_time``), on their own tensors; the op picks the implementation.

    x: (B, C_in, T, F) -> (B, C_out, T, F // P). Frequency is zero-padded by K // 2 on each side;
    time by ``K - 1 - right_pad`` on the left and ``right_pad`` on the right (K // 2 on each side
    for "same", K - 1 on the left for "causal").
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, pool: int, dropout: float, right_pad: int):
        super().__init__()
        if not 0 <= right_pad <= kernel - 1:
            raise ValueError(f"right_pad {right_pad} outside [0, {kernel - 1}]")
        self.kernel = kernel
        self.in_channels = c_in
        self.out_channels = c_out
        self.pool_size = pool
        self.context_frames = kernel - 1
        self.right_pad = right_pad
        self.bn = nn.BatchNorm2d(c_out)
        self.pool = nn.MaxPool2d(kernel_size=(1, pool), stride=(1, pool))
        self.dropout = nn.Dropout2d(dropout)
        self._structure_checked = False

    def valid_time(self, x: Tensor, history: Tensor | None = None) -> Tensor:
        """(B, C_in, T + K - 1, F) time-padded input -> (B, C_out, T, F // P): the whole block,
        through its op in rtsed.ops.block (reference, folded eval path on CPU, native kernels or
        a fused kernel).

        history: None, or a streaming block's state (B, C_in, K - 1, F), the input frames that
        precede x: the block then runs on cat(history, x) and advances history in place to that
        window's last K - 1 frames."""
        raise NotImplementedError

    def valid_time_ref(self, x: Tensor) -> Tensor:
        """``valid_time`` through the op's stock-torch twin (the reference every fast path is
        tested against), BatchNorm's bookkeeping as in ``valid_time``."""
        raise NotImplementedError

    def macs_per_frame(self, n_freq: int) -> int:
        """Multiply-accumulates of the block's convolutions per output frame, for n_freq input
        frequencies (biases, BN and activations excluded)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 0, self.context_frames - self.right_pad, self.right_pad))
        return self.valid_time(x)

    def init_state(self, batch_size: int, n_freq: int, device, dtype) -> ConvHistory:
        c_in = self.in_channels
        frames = torch.zeros(batch_size, c_in, self.context_frames, n_freq, device=device, dtype=dtype)
        if frames.device.type == "cpu":
            # The CPU path runs the CNN channels-last (each block's output is a (B, T, F, C) view):
            # a history in the same layout keeps the window's concatenation a plain block copy.
            frames = frames.contiguous(memory_format=torch.channels_last)
        return ConvHistory(frames)

    def step(self, x: Tensor, state: ConvHistory) -> Tensor:
        """x: (B, C_in, n, F) new frames -> (B, C_out, n, F // P), the causal outputs for them
        (offline frame t - right_pad for input frame t)."""
        return self.valid_time(x, state.frames)

    def _mode_error(self) -> ValueError:
        return ValueError(f"{type(self).__name__}'s BatchNorms must be in the block's train/eval mode: its op runs "
                          "them and its dropout in one mode")

    def _check_structure(self) -> None:
        """Raise ValueError where the block's modules differ from the structure its op computes
        (rtsed.ops.block: K x K convs of stride and dilation 1, frequency zero-padded by K // 2,
        with biases; affine BatchNorms; a (1, P) max-pool of stride (1, P), floor): the ops take
        tensors and numbers, so they could not honour a module changed after it was built. Run
        once, at the block's first call (per call it would cost a streaming step's time for a
        structure fixed from then on)."""
        mp = self.pool
        pool_k = mp.kernel_size if isinstance(mp.kernel_size, tuple) else (mp.kernel_size, mp.kernel_size)
        pool_s = mp.stride if isinstance(mp.stride, tuple) else (mp.stride, mp.stride)
        if (tuple(pool_k) != (1, self.pool_size) or tuple(pool_s) != tuple(pool_k) or mp.padding not in (0, (0, 0))
                or mp.dilation not in (1, (1, 1)) or mp.ceil_mode):
            raise ValueError(f"unsupported pool {mp}: only (1, {self.pool_size}) with stride (1, {self.pool_size})")
        for bn in self.modules():
            if isinstance(bn, nn.BatchNorm2d) and not bn.affine:
                raise ValueError(f"unsupported {bn}: the block's op takes an affine BatchNorm")
        self._structure_checked = True

    @staticmethod
    def _check_conv(conv: nn.Conv2d, kernel: tuple[int, int], padding: tuple[int, int], groups: int) -> None:
        if (tuple(conv.kernel_size) != kernel or tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1)
                or tuple(conv.padding) != padding or conv.groups != groups or conv.padding_mode != "zeros"
                or conv.bias is None):
            raise ValueError(f"unsupported conv {conv}: the block's op takes a {kernel} conv with bias, padding "
                             f"{padding}, groups {groups}, stride and dilation 1")


class ConvBlock(FrequencyBlock):
    """f_cnn block: Conv2d(C_in -> C_out, K x K, bias) -> ReLU -> BN -> pool -> Dropout2d, through
    rtsed.ops.block.conv_block."""

    def __init__(self, c_in: int, c_out: int, kernel: int, pool: int, dropout: float, right_pad: int):
        super().__init__(c_in, c_out, kernel, pool, dropout, right_pad)
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=(0, kernel // 2))

    def valid_time(self, x: Tensor, history: Tensor | None = None) -> Tensor:
        args, kwargs = self.conv_arguments()
        if history is None:
            return ops.conv_block(x, *args, **kwargs, cache=fold_cache(self))
        return ops.conv_block_step(x, history, *args, **kwargs, cache=fold_cache(self))

    def valid_time_ref(self, x: Tensor) -> Tensor:
        args, kwargs = self.conv_arguments()
        return ops.conv_block_ref(x, *args, **kwargs)

    def conv_arguments(self) -> tuple[tuple, dict]:
        """The tensors and numbers rtsed.ops.block.conv_block (and its twins) take after x, with
        BN's bookkeeping done as nn.BatchNorm2d.forward does it (num_batches_tracked in training):
        call once per forward. Raises ValueError where the block's structure is not the op's."""
        if not self._structure_checked:
            k = self.kernel
            self._check_conv(self.conv, (k, k), (0, k // 2), 1)
            self._check_structure()
        conv, bn_module, training = self.conv, self.bn, self.training
        if bn_module.training != training:
            raise self._mode_error()
        bn = bn_arguments(bn_module)
        return ((conv.weight, conv.bias, bn["bn_weight"], bn["bn_bias"], bn["bn_running_mean"], bn["bn_running_var"]),
                dict(pool=self.pool_size, training=training, momentum=bn["momentum"], eps=bn["eps"],
                     dropout=self.dropout.p))

    def macs_per_frame(self, n_freq: int) -> int:
        k = self.kernel
        return (n_freq + 2 * (k // 2) - k + 1) * self.out_channels * self.in_channels * k * k


class DWSBlock(FrequencyBlock):
    """f_dws block: depthwise Conv2d(C_in -> C_out, K x K, groups=C_in) -> LeakyReLU(0.01) -> BN
    -> pointwise Conv2d(C_out -> C_out, 1 x 1) -> ReLU -> BN -> pool -> Dropout2d, through
    rtsed.ops.block.dws_block.

    With C_in = 1 (block 1) the "depthwise" conv is a plain 1 -> C_out conv (depth multiplier
    C_out). The inner LeakyReLU + BN is in the authors' code, not the paper's text (docs/reference.md).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, pool: int, dropout: float, right_pad: int):
        super().__init__(c_in, c_out, kernel, pool, dropout, right_pad)
        self.depthwise = nn.Conv2d(c_in, c_out, kernel, padding=(0, kernel // 2), groups=c_in)
        self.inner_bn = nn.BatchNorm2d(c_out)
        self.pointwise = nn.Conv2d(c_out, c_out, 1)

    def valid_time(self, x: Tensor, history: Tensor | None = None) -> Tensor:
        args, kwargs = self.dws_arguments()
        if history is None:
            return ops.dws_block(x, *args, **kwargs, cache=fold_cache(self))
        return ops.dws_block_step(x, history, *args, **kwargs, cache=fold_cache(self))

    def valid_time_ref(self, x: Tensor) -> Tensor:
        args, kwargs = self.dws_arguments()
        return ops.dws_block_ref(x, *args, **kwargs)

    def dws_arguments(self) -> tuple[tuple, dict]:
        """The tensors and numbers rtsed.ops.block.dws_block (and its twins, and the fused
        launchers it runs: ``kernels.dws_block.dws_block``, rtsed.backends.cpu_block) take after
        x, with BN's bookkeeping done as nn.BatchNorm2d.forward does it (num_batches_tracked in
        training): call once per forward. Raises ValueError where the block's structure is not
        the op's."""
        if not self._structure_checked:
            k = self.kernel
            self._check_conv(self.depthwise, (k, k), (0, k // 2), self.in_channels)
            self._check_conv(self.pointwise, (1, 1), (0, 0), 1)
            self._check_structure()
        dw, pw, inner, outer, training = self.depthwise, self.pointwise, self.inner_bn, self.bn, self.training
        if inner.training != training or outer.training != training:
            raise self._mode_error()
        bn1, bn2 = bn_arguments(inner), bn_arguments(outer)
        return ((dw.weight, dw.bias, bn1["bn_weight"], bn1["bn_bias"], bn1["bn_running_mean"], bn1["bn_running_var"],
                 pw.weight, pw.bias, bn2["bn_weight"], bn2["bn_bias"], bn2["bn_running_mean"], bn2["bn_running_var"]),
                dict(pool=self.pool_size, training=training, momentum=(bn1["momentum"], bn2["momentum"]),
                     eps=(bn1["eps"], bn2["eps"]), dropout=self.dropout.p))

    def macs_per_frame(self, n_freq: int) -> int:
        k, c = self.kernel, self.out_channels
        positions = n_freq + 2 * (k // 2) - k + 1
        return positions * c * k * k + positions * c * c  # depthwise (one input channel each), pointwise


# ----------------------------------------------------------------------------------------------
# Temporal parts: f_dil and the GRU
# ----------------------------------------------------------------------------------------------


class TemporalPart(nn.Module):
    """The streaming-state protocol of a model's temporal part, all that ModelStream, the ONNX
    step graph and the engines use: a new family implements it and streams, exports and serves
    without edits elsewhere (tests/test_temporal_family.py defines one).

    - ``right_pad``: future frames each output needs (its share of the model's lookahead);
      ``out_features``: features per frame for the classifier;
    - ``forward(h)``: offline, CNN output (B, C, T, 1) -> (B, T, out_features), as if zero-padded
      in time outside [0, T);
    - ``init_state(batch_size, max_step_frames, device, dtype)``: allocate the stream state, an
      object with ``reset(streams)`` (zeros: the offline left padding);
    - ``step(h, state, skip)``: h (B, C, n, 1) new frames -> (B, n, out_features), the state
      advanced in place; output row j is offline frame ``position + j - right_pad``;
    - ``state_specs()`` and ``export_step(x, states, skip)``: the same step as a pure function of
      its state tensors, for the exported step graph: [(name, shape with "batch")], and x
      (B, n, C), the state tensors in that order -> (out (B, n, out_features), new state tensors).

    ``skip`` (B,) counts each stream's leading frames that lie before its first real CNN frame
    (the CNN's warm-up under "same" padding): zero frames there ARE the offline padding for a
    part whose state only holds past inputs, which may ignore it; a recurrent part must leave its
    state untouched by them (``skips_warmup = True``, and then ``skip`` is given while some stream
    is in its warm-up, None otherwise). ``logits`` / ``step_logits`` compose the part with the
    classifier; a family may fuse them (f_dil does)."""

    right_pad: int = 0
    skips_warmup: bool = False

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    def init_state(self, batch_size: int, max_step_frames: int, device, dtype):
        raise NotImplementedError

    def step(self, h: Tensor, state, skip: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def state_specs(self) -> list[tuple[str, tuple[int | str, ...]]]:
        raise NotImplementedError

    def export_step(self, x: Tensor, states: list[Tensor], skip: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError

    def logits(self, h: Tensor, classifier: nn.Linear) -> Tensor:
        """Offline: CNN output (B, C, T, 1) -> logits (B, T, n_classes)."""
        return classifier(self(h))

    def step_logits(self, h: Tensor, state, classifier: nn.Linear, skip: Tensor | None = None) -> Tensor:
        """A streaming step to logits: h (B, C, n, 1) -> (B, n, n_classes)."""
        return classifier(self.step(h, state, skip))


@dataclass
class FrameRing(FrameState):
    """Past input frames of f_dil in a ring buffer: frames (B, capacity, C) plus a write position.

    capacity = (K - 1) * d + max_step_frames, so writing a step's new frames never overwrites a
    frame that one of them still reads. The write position is shared by all streams of a batch
    (they advance together); a stream is reset by zeroing its rows. Frames are written in place,
    never shifted: a step costs O(new frames), whatever the dilation (d = 100 keeps 600 frames).
    """

    write_pos: int = 0

    def restore(self, streams: Tensor, saved: Tensor, stepped_frames: int) -> None:
        """Put back rows saved before a step of ``stepped_frames`` frames. The write position is
        shared and moved on by that step, so the saved frames are rotated with it: a frame k
        places behind the write position before the step is k places behind it after."""
        self.frames[streams] = torch.roll(saved, stepped_frames % self.frames.shape[1], dims=1)


class DilatedTemporal(TemporalPart):
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
        return self._flatten(self._conv_relu_bn(x, ops.dilated_temporal))

    def conv_relu_bn(self, x: Tensor) -> Tensor:
        """Reference: (B, 1, T + (K - 1) d, C) time-padded -> (B, C_out, T, W), conv -> ReLU -> BN
        (``rtsed.ops.dilated_temporal_ref``, BN as this layer's module would run it)."""
        return self._conv_relu_bn(x, ops.dilated_temporal_ref)

    def _conv_relu_bn(self, x: Tensor, op) -> Tensor:
        """``op`` (rtsed.ops.dilated_temporal or its _ref twin) on this layer's tensors; BN's
        bookkeeping (num_batches_tracked, the momentum it implies) as nn.BatchNorm2d does it."""
        bn = bn_arguments(self.bn)
        return op(x, self.conv.weight, self.conv.bias, bn["bn_weight"], bn["bn_bias"], bn["bn_running_mean"],
                  bn["bn_running_var"], dilation=self.dilation, stride=self.stride, training=bn["training"],
                  momentum=bn["momentum"], eps=bn["eps"])

    @staticmethod
    def _flatten(y: Tensor) -> Tensor:
        """(B, C_out, T, W) -> (B, T, C_out * W), channel-major (index c * W + w) as in the paper."""
        b, c, t, w = y.shape
        return y.permute(0, 2, 1, 3).reshape(b, t, c * w)

    def init_state(self, batch_size: int, max_step_frames: int, device, dtype) -> FrameRing:
        capacity = self.context_frames + max_step_frames
        return FrameRing(torch.zeros(batch_size, capacity, self.channels, device=device, dtype=dtype))

    def logits(self, h: Tensor, classifier: nn.Linear) -> Tensor:
        """Offline f_dil and the classifier: h (B, C, T, 1) -> logits (B, T, n_classes), through
        rtsed.ops.dilated_head on this layer's and the classifier's tensors."""
        args, kwargs = self.head_arguments(classifier)
        return ops.dilated_head(h, *args, **kwargs, cache=fold_cache(self))

    def head_arguments(self, classifier: nn.Linear) -> tuple[tuple, dict]:
        """The tensors and numbers rtsed.ops.dilated_head (and its twins) take after h, with BN's
        bookkeeping done as nn.BatchNorm2d.forward does it (num_batches_tracked in training):
        call once per forward."""
        bn = bn_arguments(self.bn)
        return ((self.conv.weight, self.conv.bias, bn["bn_weight"], bn["bn_bias"], bn["bn_running_mean"],
                 bn["bn_running_var"], classifier.weight, classifier.bias),
                dict(dilation=self.dilation, stride=self.stride, right_pad=self.right_pad, training=bn["training"],
                     momentum=bn["momentum"], eps=bn["eps"]))

    def step_logits(self, h: Tensor, state: FrameRing, classifier: nn.Linear, skip: Tensor | None = None) -> Tensor:
        """A streaming step to logits: h (B, C, n, 1) -> (B, n, n_classes), through
        rtsed.ops.dilated_step_logits; advances the ring's write position."""
        if self.training:
            raise RuntimeError("f_dil's streaming step runs in eval mode only (BatchNorm with running statistics)")
        conv, bn = self.conv, self.bn
        out = ops.dilated_step_logits(h, state.frames, state.write_pos, conv.weight, conv.bias, bn.weight, bn.bias,
                                      bn.running_mean, bn.running_var, classifier.weight, classifier.bias,
                                      dilation=self.dilation, stride=self.stride, eps=bn.eps, cache=fold_cache(self))
        state.write_pos = (state.write_pos + h.shape[2]) % state.frames.shape[1]
        return out

    def step(self, h: Tensor, state: FrameRing, skip: Tensor | None = None) -> Tensor:
        """h: (B, C, n, 1) new CNN frames -> (B, n, C_out * W), the causal outputs for them.
        n may exceed the ring's step capacity; the step is then done in slices."""
        if self.training:
            raise RuntimeError("f_dil's streaming step runs in eval mode only (BatchNorm with running statistics)")
        frames = h[..., 0].transpose(1, 2)  # (B, n, C)
        capacity = state.frames.shape[1]
        max_step = capacity - self.context_frames
        conv, bn = self.conv, self.bn
        outputs = []
        for i in range(0, frames.shape[1], max_step):
            part = frames[:, i:i + max_step]
            outputs.append(ops.dilated_step(part, state.frames, state.write_pos, conv.weight, conv.bias, bn.weight,
                                            bn.bias, bn.running_mean, bn.running_var, dilation=self.dilation,
                                            stride=self.stride, eps=bn.eps))
            state.write_pos = (state.write_pos + part.shape[1]) % capacity
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def folded_classifier(self, classifier: nn.Linear) -> tuple[Tensor, Tensor]:
        """Eval mode: the classifier with this layer's BN folded in (rtsed.ops.folded_classifier,
        cached with the layer's folds)."""
        bn = self.bn
        return ops.folded_classifier(classifier.weight, classifier.bias, bn.weight, bn.bias, bn.running_mean,
                                     bn.running_var, bn.eps, self.width, fold_cache(self))

    def classifier_conv(self, y: Tensor, classifier: nn.Linear) -> Tensor:
        """Eval mode: conv output y (B, C_out, n, W) -> logits as (B, n_classes, n, 1), through
        ReLU, BN and the classifier, with BN folded into the classifier. The classifier runs as a
        (1, W) convolution over the (C_out, n, W) map: in an exported step graph that is one Conv
        node, where flattening to (B, n, C_out W) first cost a Transpose and a Reshape whose
        dynamic shape took six more nodes. (The step graph takes the result to (B, n, n_classes)
        in whichever form exports to the fewest nodes.)"""
        weight, bias = self.folded_classifier(classifier)
        kernel = weight.view(weight.shape[0], self.conv.out_channels, 1, self.width)
        return F.conv2d(F.relu(y), kernel, bias)

    def _ring_window(self, frames: Tensor, state: FrameRing) -> Tensor:
        """Write frames (B, n, C) into the ring and return the (K - 1) d past frames and the n new
        ones in time order, (B, (K - 1) d + n, C) (``rtsed.ops.ring_window``: a view of the ring
        where that span does not wrap). Advances the write position."""
        window = ops.ring_window(frames, state.frames, state.write_pos, self.context_frames)
        state.write_pos = (state.write_pos + frames.shape[1]) % state.frames.shape[1]
        return window


@dataclass
class GRUHidden:
    """The GRU's hidden state h: (1, B, H). Zero at the start of a stream (the paper's h0 = 0)."""

    h: Tensor

    def reset(self, streams: Tensor | None = None) -> None:
        if streams is None:
            self.h.zero_()
        else:
            self.h[:, streams] = 0

    def save(self, streams: Tensor) -> Tensor:
        """A copy of the given streams' hidden state, for ``restore`` after a step they sat out."""
        return self.h[:, streams].clone()

    def restore(self, streams: Tensor, saved: Tensor, stepped_frames: int) -> None:
        self.h[:, streams] = saved


class GRUTemporal(TemporalPart):
    """Unidirectional one-layer GRU over frames: (B, C, T, 1) -> (B, T, H). Causal by nature."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.gru = nn.GRU(channels, hidden, batch_first=True)
        self.right_pad = 0
        self.context_frames = 0
        self.skips_warmup = True  # zero frames would move h: the warm-up must not reach it

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

    def state_specs(self) -> list[tuple[str, tuple[int | str, ...]]]:
        return [("gru_h", (1, "batch", self.gru.hidden_size))]

    def export_step(self, x: Tensor, states: list[Tensor], skip: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        out, new_h = self.step_tensors(x, states[0], skip)
        return out, [new_h]

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
