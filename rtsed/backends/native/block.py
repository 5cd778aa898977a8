"""Wrappers of block.cpp: the fused passes of a training-mode DWS block (rtsed.backends.cpu_block).

Activations are (rows, C) views of channels-last tensors (a row is one (b, t, f) position) or
(outer, F, C) when the pass needs the frequency axis (the pool), float32 or float64; per-channel
sums come back as float64 (C,) tensors. Each call uses ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rtsed.backends.native import call, channel_sums, check, declare

declare("act_stats", ["p", "i64", "i64", "T", "int", "p", "p", "int"])
declare("relu_stats_pool", ["p", "i64", "i64", "i64", "i64", "p", "p", "p", "p", "p", "int"])
declare("relu_bn_pool_backward", ["p", "p", "p", "p", "p", "p", "i64", "i64", "i64", "i64", "p", "int"])
declare("grad_sums", ["p", "p", "i64", "i64", "p", "p", "int"])
declare("leaky_bn_backward", ["p", "p", "p", "p", "p", "T", "i64", "i64", "p", "int"])


def act_stats(z: Tensor, slope: float, write: bool) -> tuple[Tensor, Tensor]:
    """z: (rows, C). a = z > 0 ? z : slope z (in place when ``write``) -> per-channel float64
    (sum of a, sum of a^2), each (C,)."""
    check("act_stats", z.dtype, z=z)
    total, squares = channel_sums(z.shape[-1], 2)
    call("act_stats", z.dtype, z.data_ptr(), z.numel() // z.shape[-1], z.shape[-1], slope, int(write),
                                    total.data_ptr(), squares.data_ptr(), torch.get_num_threads())
    return total, squares


def relu_stats_pool(z: Tensor, pool: int, direction: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """z: (outer, F, C) pre-ReLU, direction (C,) = sign of the BN scale that follows (+1, -1, 0).
    -> selected (outer, F // pool, C): per window of ``pool`` frequencies the relu(z) value that
    max-pooling the BN output picks (max, min, or first for direction +1, -1, 0); argpos
    (outer, F // pool, C) int8, its position in the window; per-channel float64 sum and sum of
    squares of relu(z) over all F. z is only read."""
    check("relu_stats_pool", z.dtype, z=z, direction=direction)
    outer, freq, channels = z.shape
    if not 1 <= pool <= min(freq, 127):
        raise ValueError(f"relu_stats_pool: pool {pool} outside [1, min(F={freq}, 127)]")
    selected = z.new_empty(outer, freq // pool, channels)
    argpos = torch.empty(outer, freq // pool, channels, dtype=torch.int8)
    total, squares = channel_sums(channels, 2)
    call("relu_stats_pool", z.dtype, z.data_ptr(), outer, freq, channels, pool, direction.data_ptr(),
                                          selected.data_ptr(), argpos.data_ptr(), total.data_ptr(),
                                          squares.data_ptr(), torch.get_num_threads())
    return selected, argpos, total, squares


def relu_bn_pool_backward(z: Tensor, grad: Tensor, argpos: Tensor, scale: Tensor, alpha: Tensor, beta: Tensor,
                          pool: int) -> Tensor:
    """In place: z (outer, F, C) pre-ReLU -> dL/dz for pool(BN(relu(z))) given grad
    (outer, F // pool, C) = dL/d(pooled), the argpos of ``relu_stats_pool``, and BN's backward as
    dL/dr = scale g + alpha + beta r (per channel, (C,) each). Returns the float64 per-channel
    sum of dL/dz (C,)."""
    check("relu_bn_pool_backward", z.dtype, z=z, grad=grad, argpos=argpos, scale=scale, alpha=alpha, beta=beta)
    outer, freq, channels = z.shape
    if grad.shape != argpos.shape or grad.shape != (outer, freq // pool, channels):
        raise ValueError(f"relu_bn_pool_backward: grad {tuple(grad.shape)} / argpos {tuple(argpos.shape)} "
                         f"do not match z {tuple(z.shape)} pooled by {pool}")
    (total,) = channel_sums(channels, 1)
    call("relu_bn_pool_backward", z.dtype, z.data_ptr(), grad.data_ptr(), argpos.data_ptr(), scale.data_ptr(),
         alpha.data_ptr(), beta.data_ptr(), outer, freq, channels, pool, total.data_ptr(), torch.get_num_threads())
    return total


def grad_sums(g: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """g, a: (rows, C) -> per-channel float64 (sum of g, sum of g * a), each (C,)."""
    check("grad_sums", g.dtype, g=g, a=a)
    if g.shape != a.shape:
        raise ValueError(f"grad_sums: shapes {tuple(g.shape)} and {tuple(a.shape)} differ")
    total, products = channel_sums(g.shape[-1], 2)
    call("grad_sums", g.dtype, g.data_ptr(), a.data_ptr(), g.numel() // g.shape[-1], g.shape[-1],
                                    total.data_ptr(), products.data_ptr(), torch.get_num_threads())
    return total, products


def leaky_bn_backward(g: Tensor, a: Tensor, scale: Tensor, alpha: Tensor, beta: Tensor, slope: float) -> Tensor:
    """In place: g (rows, C) = dL/d(BN output) -> dL/dz, where a = leaky(z, slope) (rows, C) was
    BN's input and BN's backward is dL/da = scale g + alpha + beta a. Returns the float64
    per-channel sum of dL/dz (C,)."""
    check("leaky_bn_backward", g.dtype, g=g, a=a, scale=scale, alpha=alpha, beta=beta)
    if g.shape != a.shape:
        raise ValueError(f"leaky_bn_backward: shapes {tuple(g.shape)} and {tuple(a.shape)} differ")
    (total,) = channel_sums(g.shape[-1], 1)
    call("leaky_bn_backward", g.dtype, g.data_ptr(), a.data_ptr(), scale.data_ptr(), alpha.data_ptr(),
                                            beta.data_ptr(), slope, g.numel() // g.shape[-1], g.shape[-1],
                                            total.data_ptr(), torch.get_num_threads())
    return total


declare("depthwise_weight_grad", ["p", "p", "i64", "i64", "i64", "i64", "i64", "i64", "p", "int", "p"])
declare("depthwise_input_grad", ["p", "p", "i64", "i64", "i64", "i64", "i64", "p", "int", "p"])
DEPTHWISE_KERNELS = (3, 5, 7)  # the K x K sizes block.cpp's depthwise backward is compiled for


def _run(name: str, dtype: torch.dtype, *args) -> None:
    status = torch.zeros(1, dtype=torch.int32)
    call(name, dtype, *args, torch.get_num_threads(), status.data_ptr())
    if int(status):
        raise ValueError(f"native {name}: kernel size not in {DEPTHWISE_KERNELS}")


def depthwise_weight_grad(dd: Tensor, x_padded: Tensor, kernel: int) -> Tensor:
    """Weight gradient of a depthwise K x K conv (stride 1, frequency zero-padded by K // 2, no
    time padding), channels-last. dd: (B, T, F, C) output gradient; x_padded: (B, T + K - 1,
    F + K - 1, Cx) the input, zero-padded in frequency, Cx = C (depthwise) or 1 (one input
    channel, depth multiplier C). -> (C, K * K): dw[c, i K + j] = sum dd[b, t, f, c]
    x_padded[b, t + i, f + j, c or 0]."""
    check("depthwise_weight_grad", dd.dtype, dd=dd, x_padded=x_padded)
    b, frames, freq, channels = dd.shape
    cx = x_padded.shape[-1]
    if x_padded.shape != (b, frames + kernel - 1, freq + kernel - 1, cx) or cx not in (1, channels):
        raise ValueError(f"depthwise_weight_grad: x_padded {tuple(x_padded.shape)} does not fit dd "
                         f"{tuple(dd.shape)} and kernel {kernel}")
    dw = dd.new_empty(channels, kernel * kernel)
    _run("depthwise_weight_grad", dd.dtype, dd.data_ptr(), x_padded.data_ptr(), b, frames, freq, channels,
         cx, kernel, dw.data_ptr())
    return dw


def depthwise_input_grad(dd_padded: Tensor, weight: Tensor, kernel: int) -> Tensor:
    """Input gradient of a true depthwise K x K conv (C_in == C; stride 1, frequency zero-padded
    by K // 2, no time padding), channels-last. dd_padded: (B, T + 2 (K - 1), F + K - 1, C), the
    output gradient zero-padded by K - 1 frames each side in time and K // 2 bins each side in
    frequency; weight (C, K * K). -> dx (B, T + K - 1, F, C)."""
    check("depthwise_input_grad", dd_padded.dtype, dd_padded=dd_padded, weight=weight)
    b, t_padded, f_padded, channels = dd_padded.shape
    frames, freq = t_padded - 2 * (kernel - 1), f_padded - kernel + 1
    if weight.shape != (channels, kernel * kernel) or frames < 1 or freq < 1:
        raise ValueError(f"depthwise_input_grad: dd_padded {tuple(dd_padded.shape)} / weight "
                         f"{tuple(weight.shape)} do not fit kernel {kernel}")
    dx = dd_padded.new_empty(b, frames + kernel - 1, freq, channels)
    _run("depthwise_input_grad", dd_padded.dtype, dd_padded.data_ptr(), weight.data_ptr(), b, frames, freq,
         channels, kernel, dx.data_ptr())
    return dx


declare("conv1_leaky_stats", ["p", "p", "p", "i64", "i64", "i64", "i64", "i64", "T", "p", "p", "p", "int", "p"])


def conv1_leaky_stats(x_padded: Tensor, weight: Tensor, bias: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """Block 1's conv (one input channel -> C, K x K, stride 1) with its LeakyReLU and BN1's sums.
    x_padded: (B, T + K - 1, F + K - 1), the input zero-padded by K // 2 in frequency; weight
    (C, K * K); bias (C,). -> a (B * T * F, C) channels-last rows of leaky(conv(x)), and the
    per-channel float64 sum of a and of a^2."""
    check("conv1_leaky_stats", x_padded.dtype, x_padded=x_padded, weight=weight, bias=bias)
    b, t_padded, f_padded = x_padded.shape
    channels, taps = weight.shape
    kernel = int(round(taps ** 0.5))
    frames, freq = t_padded - kernel + 1, f_padded - kernel + 1
    if kernel * kernel != taps or bias.shape != (channels,) or frames < 1 or freq < 1:
        raise ValueError(f"conv1_leaky_stats: x_padded {tuple(x_padded.shape)}, weight {tuple(weight.shape)} and "
                         f"bias {tuple(bias.shape)} do not fit one K x K conv")
    a = x_padded.new_empty(b * frames * freq, channels)
    total, squares = channel_sums(channels, 2)
    _run("conv1_leaky_stats", x_padded.dtype, x_padded.data_ptr(), weight.data_ptr(), bias.data_ptr(), b, frames,
         freq, channels, kernel, slope, a.data_ptr(), total.data_ptr(), squares.data_ptr())
    return a, total, squares
