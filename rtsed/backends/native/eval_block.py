"""Wrappers of eval_block.cpp: the non-GEMM parts of an eval-mode DWS block (the folded
arithmetic of rtsed.ops.folded_block, run by rtsed.backends.cpu_eval.dws_block offline and
streaming).

Activations are channels-last: (B, T, F, C) row-major with C contiguous, float32 or float64.
Each call uses ``torch.get_num_threads()`` threads and runs under a profiler label
``rtsed::native::<name>`` while profiled. Callers check ``rtsed.backends.dispatch.native_eval`` and otherwise
run their torch compositions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rtsed.backends.native import call, check, declare

declare("depthwise_conv_leaky",
        ["p", "i64", "p", "i64", "i64", "i64", "i64", "i64", "i64", "p", "p", "T", "p", "int", "int"])
declare("pool_relu_affine", ["p", "i64", "i64", "i64", "i64", "p", "p", "p", "p", "int"])

KERNELS = (3, 5, 7)  # the K x K sizes eval_block.cpp's conv is compiled for


def depthwise_conv_leaky(x: Tensor, weight_taps: Tensor, bias: Tensor, kernel: int, slope: float,
                         history: Tensor | None = None, advance_history: bool = False) -> Tensor:
    """A K x K conv, stride 1, frequency zero-padded by K // 2, no time padding, then
    LeakyReLU(slope): depthwise (C -> C) or from one input channel (1 -> C).

    x: (B, N, F, Cx) new input frames, Cx = C or 1; history: (B, H, F, Cx) frames that precede x
    (a streaming block's state), or None (H = 0); the conv runs over cat(history, x) in time
    without building it. With ``advance_history``, history is then overwritten in place with the
    last H frames of cat(history, x) (the streaming state update). weight_taps: (K K, C), tap
    (i, j) of channel c at [i K + j, c]; bias (C,). -> (B, H + N - K + 1, F, C)."""
    head = x if history is None else history
    check("depthwise_conv_leaky", x.dtype, x=x, head=head, weight_taps=weight_taps, bias=bias)
    b, n, freq, cx = x.shape
    h = 0 if history is None else history.shape[1]
    taps, channels = weight_taps.shape
    frames = h + n - kernel + 1
    if kernel not in KERNELS:
        raise ValueError(f"depthwise_conv_leaky: kernel {kernel} not in {KERNELS}")
    if taps != kernel * kernel or bias.shape != (channels,) or cx not in (1, channels) or frames < 1:
        raise ValueError(f"depthwise_conv_leaky: x {tuple(x.shape)}, weight_taps {tuple(weight_taps.shape)}, "
                         f"bias {tuple(bias.shape)} do not fit one {kernel} x {kernel} conv")
    if history is not None and (history.shape[0], history.shape[2], history.shape[3]) != (b, freq, cx):
        raise ValueError(f"depthwise_conv_leaky: history {tuple(history.shape)} does not match x {tuple(x.shape)}")
    out = x.new_empty(b, frames, freq, channels)
    call("depthwise_conv_leaky", x.dtype, head.data_ptr(), h, x.data_ptr(), n, b, freq, channels, cx, kernel,
         weight_taps.data_ptr(), bias.data_ptr(), slope, out.data_ptr(), int(advance_history and history is not None),
         torch.get_num_threads())
    return out


def pool_relu_affine(y: Tensor, pool: int, sign: Tensor, magnitude: Tensor, shift: Tensor) -> Tensor:
    """max-pool over groups of ``pool`` frequencies of BN(ReLU(y)), BN an affine a r + b given
    as sign = sign(a), magnitude = |a| and shift = b (each C values, contiguous).
    y: (outer, F, C) -> (outer, F // pool, C); the last F mod pool frequencies are dropped."""
    check("pool_relu_affine", y.dtype, y=y, sign=sign, magnitude=magnitude, shift=shift)
    outer, freq, channels = y.shape
    if not 1 <= pool <= freq or any(t.numel() != channels for t in (sign, magnitude, shift)):
        raise ValueError(f"pool_relu_affine: y {tuple(y.shape)} with pool {pool} and {sign.numel()} / "
                         f"{magnitude.numel()} / {shift.numel()} affine values")
    out = y.new_empty(outer, freq // pool, channels)
    call("pool_relu_affine", y.dtype, y.data_ptr(), outer, freq, channels, pool, sign.data_ptr(),
         magnitude.data_ptr(), shift.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out
