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
from rtsed.ops.fold import cached_fold
from rtsed.backends.batchnorm import bn_arguments
from rtsed.backends.cpu import _relu_owned, conv2d_like_input, fused_linear, one_channel_patches


# ----------------------------------------------------------------------------------------------
# Frequency blocks: f_cnn and f_dws
# ----------------------------------------------------------------------------------------------


def folded_cache(module: nn.Module, name: str, sources: list[Tensor], compute):
    """``compute()`` (folded weights), cached on the module while its sources are unchanged
    (``rtsed.ops.fold.cached_fold`` with the module's own cache: the ops the layer calls are
    handed the same dict)."""
    return cached_fold(fold_cache(module), name, sources, compute)


def fold_cache(module: nn.Module) -> dict:
    """The module's cache of folded weights (a plain dict, handed to the ops it calls)."""
    return module.__dict__.setdefault("_folded_cache", {})


def bn_sources(bn: nn.BatchNorm2d) -> list[Tensor]:
    return [bn.weight, bn.bias, bn.running_mean, bn.running_var]


def bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as a per-channel affine y = scale * x + shift (running statistics)."""
    return ops.bn_affine(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)



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

    def save(self, streams: Tensor) -> Tensor:
        """A copy of the given streams' state, for ``restore`` after a step they sat out."""
        return self.frames[streams].clone()

    def restore(self, streams: Tensor, saved: Tensor, stepped_frames: int) -> None:
        self.frames[streams] = saved


class FrequencyBlock(nn.Module):
    """One CNN block: time-frequency conv (K x K) -> ReLU -> BatchNorm -> max-pool over frequency
    (1, P) -> Dropout2d. Subclasses define the conv part (``conv_valid_time``); ``valid_time``
    runs the whole block on time-padded input, and is what a fused kernel replaces.

    x: (B, C_in, T, F) -> (B, C_out, T, F // P). Frequency is zero-padded by K // 2 on each side;
    time by ``K - 1 - right_pad`` on the left and ``right_pad`` on the right (K // 2 on each side
    for "same", K - 1 on the left for "causal").
    """

    separable = False  # DWSBlock: depthwise-separable (the ops dispatch on it)

    def __init__(self, c_out: int, kernel: int, pool: int, dropout: float, right_pad: int):
        super().__init__()
        if not 0 <= right_pad <= kernel - 1:
            raise ValueError(f"right_pad {right_pad} outside [0, {kernel - 1}]")
        self.kernel = kernel
        self.out_channels = c_out
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

    def valid_time(self, x: Tensor, history: Tensor | None = None) -> Tensor:
        """(B, C_in, T + K - 1, F) time-padded input -> (B, C_out, T, F // P): the whole block,
        through rtsed.ops (reference, folded eval path on CPU, or a fused kernel).

        history: None, or a streaming block's state (B, C_in, K - 1, F), the input frames that
        precede x: the block then runs on cat(history, x) and advances history in place to that
        window's last K - 1 frames."""
        if history is None:
            return ops.frequency_block(self, x)
        return ops.frequency_block_step(self, x, history)

    def conv_folded(self, x: Tensor, export: bool = False) -> Tensor:
        """Eval mode: the conv part with every BN before the output ReLU folded in. Works in x's
        memory format: channels-last on the CPU, offline and streaming alike (the streaming
        histories are kept channels-last there too, so a step's window is a plain block copy)."""
        raise NotImplementedError

    def folded_valid_time(self, x: Tensor, export: bool = False) -> Tensor:
        """Eval-mode fast path, equal to ``post(conv_valid_time(x))`` up to rounding: BNs
        folded, and the output BN (after ReLU, a per-channel affine y = a r + b) applied after
        the max-pool, on 1/P of the values: max_p(a r_p + b) = |a| max_p(sign(a) r_p) + b holds
        for either sign of a. Dropout is off in eval.

        With a >= 0 in every channel (trained models here: the sign path is for the others) the
        ReLU moves after the pool too, max_p(a relu(y_p) + b) = a relu(max_p y_p) + b, leaving
        one full-resolution pass (the pool) instead of three. On a channels-last y the pool is a
        max over groups of P rows of its (B, T, F, C) view. Traced for ONNX, the ReLU stays
        before the pool (onnxruntime fuses it into the conv) and the affine is a depthwise 1x1
        Conv (one node instead of Mul and Add): ``export``, rtsed.backends.dispatch's onnx-folded.

        rtsed.backends.cpu_eval.dws_block is the same arithmetic through native kernels."""
        sign, magnitude, shift, nonnegative = folded_cache(self, "post", bn_sources(self.bn), self._pool_affine)
        y = self.conv_folded(x, export)
        if not nonnegative:
            pooled = F.max_pool2d(F.relu(y) * sign, self.pool.kernel_size, self.pool.stride)
            return torch.addcmul(shift, pooled, magnitude)
        if export:
            pooled = F.max_pool2d(F.relu(y), self.pool.kernel_size, self.pool.stride)
            return F.conv2d(pooled, magnitude[:, :, :, None], shift.view(-1), groups=magnitude.shape[0])
        rows = y.permute(0, 2, 3, 1)  # (B, T, F, C)
        if not rows.is_contiguous():
            pooled = _relu_owned(F.max_pool2d(y, self.pool.kernel_size, self.pool.stride))
            return torch.addcmul(shift, pooled, magnitude)
        p = self.pool.kernel_size[1]
        f = rows.shape[2] // p * p  # floor: the last F mod P frequencies are dropped
        pooled = _relu_owned(rows[:, :, :f].unflatten(2, (-1, p)).amax(3))  # (B, T, F // P, C)
        return torch.addcmul(shift.view(-1), pooled, magnitude.view(-1)).permute(0, 3, 1, 2)

    def _pool_affine(self) -> tuple[Tensor, Tensor, Tensor, bool]:
        """(sign(a), |a|, b) of the output BN, each (C, 1, 1) to broadcast over (T, F), and
        whether a >= 0 in every channel."""
        scale, shift = bn_affine(self.bn)
        nonnegative = bool((scale >= 0).all())
        return torch.sign(scale)[:, None, None], scale.abs()[:, None, None], shift[:, None, None], nonnegative

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


class ConvBlock(FrequencyBlock):
    """f_cnn block: Conv2d(C_in -> C_out, K x K, bias) -> ReLU -> BN -> pool -> Dropout2d."""

    def __init__(self, c_in: int, c_out: int, kernel: int, pool: int, dropout: float, right_pad: int):
        super().__init__(c_out, kernel, pool, dropout, right_pad)
        self.in_channels = c_in
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=(0, kernel // 2))

    def conv_valid_time(self, x: Tensor) -> Tensor:
        return conv2d_like_input(x, self.conv)

    def conv_folded(self, x: Tensor, export: bool = False) -> Tensor:
        return conv2d_like_input(x, self.conv)


class DWSBlock(FrequencyBlock):
    """f_dws block: depthwise Conv2d(C_in -> C_out, K x K, groups=C_in) -> LeakyReLU(0.01) -> BN
    -> pointwise Conv2d(C_out -> C_out, 1 x 1) -> ReLU -> BN -> pool -> Dropout2d.

    With C_in = 1 (block 1) the "depthwise" conv is a plain 1 -> C_out conv (depth multiplier
    C_out). The inner LeakyReLU + BN is in the authors' code, not the paper's text (docs/reference.md).
    """

    separable = True

    def __init__(self, c_in: int, c_out: int, kernel: int, pool: int, dropout: float, right_pad: int):
        super().__init__(c_out, kernel, pool, dropout, right_pad)
        self.in_channels = c_in
        self.depthwise = nn.Conv2d(c_in, c_out, kernel, padding=(0, kernel // 2), groups=c_in)
        self.inner_bn = nn.BatchNorm2d(c_out)
        self.pointwise = nn.Conv2d(c_out, c_out, 1)

    def conv_valid_time(self, x: Tensor) -> Tensor:
        depthwise = conv2d_like_input(x, self.depthwise)
        return conv2d_like_input(self.inner_bn(F.leaky_relu(depthwise, 0.01)), self.pointwise)

    def conv_folded(self, x: Tensor, export: bool = False) -> Tensor:
        dw = self.depthwise
        sources = [self.pointwise.weight, self.pointwise.bias, *bn_sources(self.inner_bn), dw.weight]
        weight, bias, dw_weight_cl = folded_cache(self, "pointwise", sources, self._folded_pointwise)
        if export:
            # ONNX: onnxruntime runs a 1x1 Conv on NCHW directly; the rows GEMM would cost two
            # Transposes there.
            a = F.leaky_relu(self.depthwise(x), 0.01)
            return F.conv2d(a, weight[:, :, None, None], bias)
        b, _, t_in, f = x.shape
        k = self.kernel
        if self.in_channels == 1:
            # Block 1 (1 -> C) as a patches GEMM straight into channels-last rows: oneDNN's
            # one-channel conv is several times slower than this GEMM at streaming sizes.
            a = fused_linear(one_channel_patches(x, k), self.depthwise.weight.view(-1, k * k),
                             self.depthwise.bias, "leaky_relu")
        else:
            d = conv2d_like_input(x, dw, dw_weight_cl)  # the weight restrided once, not per call
            d = F.leaky_relu_(d, 0.01) if not d.requires_grad else F.leaky_relu(d, 0.01)
            # The pointwise conv as one GEMM over channels-last rows (a view when d is channels-last).
            a = d.permute(0, 2, 3, 1).reshape(-1, d.shape[1])
        out = fused_linear(a, weight, bias)
        return out.view(b, t_in - k + 1, f, -1).permute(0, 3, 1, 2)

    def dws_arguments(self) -> tuple[tuple, dict]:
        """The tensors and numbers the fused DWS op (``kernels.dws_block.dws_block``, and its twin
        ``dws_block_ref``) takes after x, with BN's bookkeeping done as nn.BatchNorm2d.forward does
        it (num_batches_tracked in training): call once per forward. Raises ValueError where this
        block's structure is not the one the op assumes."""
        dw, mp, bn1, bn2 = self.depthwise, self.pool, self.inner_bn, self.bn
        k = dw.kernel_size[0]
        if (dw.kernel_size != (k, k) or tuple(dw.stride) != (1, 1) or tuple(dw.dilation) != (1, 1)
                or tuple(dw.padding) != (0, k // 2) or dw.groups != dw.in_channels or dw.padding_mode != "zeros"):
            raise ValueError(f"unsupported depthwise conv {dw}")
        pool_k = mp.kernel_size if isinstance(mp.kernel_size, tuple) else (mp.kernel_size, mp.kernel_size)
        pool_s = mp.stride if isinstance(mp.stride, tuple) else (mp.stride, mp.stride)
        if (pool_k[0] != 1 or tuple(pool_s) != tuple(pool_k) or mp.padding not in (0, (0, 0))
                or mp.dilation not in (1, (1, 1)) or mp.ceil_mode):
            raise ValueError(f"unsupported pool {mp}: only (1, P) with stride (1, P)")
        if not bn1.training == bn2.training == self.training:
            raise ValueError("the fused DWS op needs both BatchNorms in the block's train/eval mode")
        args1, args2 = bn_arguments(bn1), bn_arguments(bn2)
        pw = self.pointwise
        return ((dw.weight, dw.bias, bn1.weight, bn1.bias, args1["bn_running_mean"], args1["bn_running_var"],
                 pw.weight, pw.bias, bn2.weight, bn2.bias, args2["bn_running_mean"], args2["bn_running_var"]),
                dict(pool=pool_k[1], training=self.training, momentum=(args1["momentum"], args2["momentum"]),
                     eps=(bn1.eps, bn2.eps)))

    def eval_operands(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Eval mode: the folded block's operands for rtsed.backends.cpu_eval.dws_block, cached
        while the parameters and BN statistics are unchanged: the pointwise weight (C, C) and bias
        (C,) with the inner BN folded in, the depthwise taps (K K, C) and bias (C,), and the
        output BN as (sign, magnitude, shift), each (C, 1, 1)."""
        dw = self.depthwise
        sources = [self.pointwise.weight, self.pointwise.bias, *bn_sources(self.inner_bn), dw.weight]
        weight, bias, _ = folded_cache(self, "pointwise", sources, self._folded_pointwise)
        taps = folded_cache(self, "depthwise_taps", [dw.weight],
                            lambda: dw.weight.reshape(dw.out_channels, -1).t().contiguous())  # (K K, C)
        sign, magnitude, shift, _ = folded_cache(self, "post", bn_sources(self.bn), self._pool_affine)
        return weight, bias, taps, dw.bias, sign, magnitude, shift

    def _folded_pointwise(self) -> tuple[Tensor, Tensor, Tensor]:
        """The pointwise conv with the inner BN folded in, weight (C, C) and bias (C,), and the
        depthwise weight restrided channels-last (for ``conv_folded``'s channels-last input)."""
        # The inner BN precedes the pointwise conv: W (s x + t) + b = (W s) x + (W t + b).
        scale, shift = bn_affine(self.inner_bn)
        weight = self.pointwise.weight[:, :, 0, 0]
        return (weight * scale, self.pointwise.bias + weight @ shift,  # (no addmv: ONNX lacks it)
                self.depthwise.weight.to(memory_format=torch.channels_last))


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

    def save(self, streams: Tensor) -> Tensor:
        """A copy of the given streams' rows, for ``restore`` after a step they sat out."""
        return self.frames[streams].clone()

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
