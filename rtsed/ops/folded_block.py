"""The CNN blocks' eval-mode arithmetic with every BatchNorm folded, as functions of tensors: the
``cpu-folded`` and ``onnx-folded`` implementations of rtsed.ops.block's ops, and the folded
operands its ``native`` one hands to rtsed.backends.cpu_eval.

Folds are cached in the dict the layer hands over (rtsed.ops.fold.cached_fold), keyed on the
tensors they are folded from, so a streaming step re-folds nothing.

The output BN follows the ReLU, so it cannot fold into the conv; as a per-channel affine
y = a r + b it moves after the max-pool instead, onto 1/P of the values:
max_p(a r_p + b) = |a| max_p(sign(a) r_p) + b holds for either sign of a. With a >= 0 in every
channel (trained models here: the sign path is for the others) the ReLU moves after the pool too,
max_p(a relu(y_p) + b) = a relu(max_p y_p) + b, leaving one full-resolution pass (the pool)
instead of three. The inner BN of a DWS block precedes the pointwise conv, and folds into it:
W (s u + t) + c = (W s) u + (W t + c). Dropout is off in eval.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rtsed.backends.cpu import _relu_owned, conv2d_like_input, fused_linear, one_channel_patches
from rtsed.ops.fold import bn_affine, cached_fold

NEGATIVE_SLOPE = 0.01  # the DWS block's inner LeakyReLU (docs/reference.md)


def pool_affine(bn_weight: Tensor, bn_bias: Tensor, bn_running_mean: Tensor, bn_running_var: Tensor, eps: float,
                cache: dict | None) -> tuple[Tensor, Tensor, Tensor, bool]:
    """The output BN as (sign(a), |a|, b), each (C, 1, 1) to broadcast over (T, F), and whether
    a >= 0 in every channel; cached."""

    def compute():
        scale, shift = bn_affine(bn_weight, bn_bias, bn_running_mean, bn_running_var, eps)
        nonnegative = bool((scale >= 0).all())
        return torch.sign(scale)[:, None, None], scale.abs()[:, None, None], shift[:, None, None], nonnegative

    return cached_fold(cache, "post", [bn_weight, bn_bias, bn_running_mean, bn_running_var], compute)


def pooled_affine(y: Tensor, bn_weight: Tensor, bn_bias: Tensor, bn_running_mean: Tensor, bn_running_var: Tensor,
                  eps: float, pool: int, export: bool, cache: dict | None) -> Tensor:
    """ReLU -> output BN (eval) -> max-pool (1, P) of a conv's output y (B, C, T, F) ->
    (B, C, T, F // P), the BN applied after the pool. Works in y's memory format: on a
    channels-last y the pool is a max over groups of P rows of its (B, T, F, C) view. ``export``
    (traced for ONNX): the ReLU stays before the pool (onnxruntime fuses it into the conv) and the
    affine is a depthwise 1x1 Conv (one node instead of Mul and Add)."""
    sign, magnitude, shift, nonnegative = pool_affine(bn_weight, bn_bias, bn_running_mean, bn_running_var, eps,
                                                      cache)
    window = (1, pool)
    if not nonnegative:
        pooled = F.max_pool2d(F.relu(y) * sign, window, window)
        return torch.addcmul(shift, pooled, magnitude)
    if export:
        pooled = F.max_pool2d(F.relu(y), window, window)
        return F.conv2d(pooled, magnitude[:, :, :, None], shift.view(-1), groups=magnitude.shape[0])
    rows = y.permute(0, 2, 3, 1)  # (B, T, F, C)
    if not rows.is_contiguous():
        pooled = _relu_owned(F.max_pool2d(y, window, window))
        return torch.addcmul(shift, pooled, magnitude)
    f = rows.shape[2] // pool * pool  # floor: the last F mod P frequencies are dropped
    pooled = _relu_owned(rows[:, :, :f].unflatten(2, (-1, pool)).amax(3))  # (B, T, F // P, C)
    return torch.addcmul(shift.view(-1), pooled, magnitude.view(-1)).permute(0, 3, 1, 2)


def conv_block_folded(x: Tensor, conv_weight: Tensor, conv_bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                      bn_running_mean: Tensor, bn_running_var: Tensor, *, pool: int, eps: float, export: bool,
                      cache: dict | None) -> Tensor:
    """f_cnn's block in eval mode (rtsed.ops.block.conv_block's cpu-folded / onnx-folded):
    x (B, C_in, T + K - 1, F) time-padded -> (B, C_out, T, F // P). The conv runs in x's memory
    format, its weight restrided channels-last once (cached) for a channels-last x."""
    k = conv_weight.shape[-1]
    weight_cl = cached_fold(cache, "conv_channels_last", [conv_weight],
                            lambda: conv_weight.to(memory_format=torch.channels_last))
    y = conv2d_like_input(x, conv_weight, conv_bias, (0, k // 2), 1, weight_cl)
    return pooled_affine(y, bn_weight, bn_bias, bn_running_mean, bn_running_var, eps, pool, export, cache)


def folded_pointwise(dw_weight: Tensor, bn1_weight: Tensor, bn1_bias: Tensor, bn1_running_mean: Tensor,
                     bn1_running_var: Tensor, pw_weight: Tensor, pw_bias: Tensor, eps: float,
                     cache: dict | None) -> tuple[Tensor, Tensor, Tensor]:
    """The pointwise conv with the inner BN folded in, weight (C, C) and bias (C,), and the
    depthwise weight restrided channels-last (for a channels-last input); cached."""

    def compute():
        scale, shift = bn_affine(bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var, eps)
        weight = pw_weight[:, :, 0, 0]
        return (weight * scale, pw_bias + weight @ shift,  # (no addmv: ONNX lacks it)
                dw_weight.to(memory_format=torch.channels_last))

    sources = [pw_weight, pw_bias, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var, dw_weight]
    return cached_fold(cache, "pointwise", sources, compute)


def dws_block_folded(x: Tensor, dw_weight: Tensor, dw_bias: Tensor, bn1_weight: Tensor, bn1_bias: Tensor,
                     bn1_running_mean: Tensor, bn1_running_var: Tensor, pw_weight: Tensor, pw_bias: Tensor,
                     bn2_weight: Tensor, bn2_bias: Tensor, bn2_running_mean: Tensor, bn2_running_var: Tensor, *,
                     pool: int, eps: tuple, export: bool, cache: dict | None) -> Tensor:
    """f_dws's block in eval mode (rtsed.ops.block.dws_block's cpu-folded / onnx-folded):
    x (B, C_in, T + K - 1, F) time-padded -> (B, C, T, F // P); ``eps``: (inner, outer).

    The depthwise conv, its LeakyReLU and the pointwise GEMM with the inner BN folded in run in
    x's memory format: channels-last on the CPU, offline and streaming alike (the streaming
    histories are kept channels-last there too, so a step's window is a plain block copy)."""
    weight, bias, dw_weight_cl = folded_pointwise(dw_weight, bn1_weight, bn1_bias, bn1_running_mean,
                                                  bn1_running_var, pw_weight, pw_bias, eps[0], cache)
    k = dw_weight.shape[-1]
    c_in = x.shape[1]
    if export:
        # ONNX: onnxruntime runs a 1x1 Conv on NCHW directly; the rows GEMM would cost two
        # Transposes there.
        a = F.leaky_relu(F.conv2d(x, dw_weight, dw_bias, padding=(0, k // 2), groups=c_in), NEGATIVE_SLOPE)
        y = F.conv2d(a, weight[:, :, None, None], bias)
    else:
        b, _, t_in, f = x.shape
        if c_in == 1:
            # Block 1 (1 -> C) as a patches GEMM straight into channels-last rows: oneDNN's
            # one-channel conv is several times slower than this GEMM at streaming sizes.
            a = fused_linear(one_channel_patches(x, k), dw_weight.view(-1, k * k), dw_bias, "leaky_relu")
        else:
            d = conv2d_like_input(x, dw_weight, dw_bias, (0, k // 2), c_in, dw_weight_cl)
            d = F.leaky_relu_(d, NEGATIVE_SLOPE) if not d.requires_grad else F.leaky_relu(d, NEGATIVE_SLOPE)
            # The pointwise conv as one GEMM over channels-last rows (a view when d is channels-last).
            a = d.permute(0, 2, 3, 1).reshape(-1, d.shape[1])
        y = fused_linear(a, weight, bias).view(b, t_in - k + 1, f, -1).permute(0, 3, 1, 2)
    return pooled_affine(y, bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var, eps[1], pool, export, cache)


def native_operands(dw_weight: Tensor, bn1_weight: Tensor, bn1_bias: Tensor, bn1_running_mean: Tensor,
                    bn1_running_var: Tensor, pw_weight: Tensor, pw_bias: Tensor, bn2_weight: Tensor,
                    bn2_bias: Tensor, bn2_running_mean: Tensor, bn2_running_var: Tensor, eps: tuple,
                    cache: dict | None) -> tuple[Tensor, ...]:
    """The folded DWS block's operands for rtsed.backends.cpu_eval.dws_block, all but the
    depthwise bias (which the kernel reads as it is): the pointwise weight (C, C) and bias (C,)
    with the inner BN folded in, the depthwise taps (K K, C), and the output BN as (sign,
    magnitude, shift), each (C, 1, 1); cached as one fold, so a streaming step checks one key."""
    sources = [dw_weight, pw_weight, pw_bias, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var,
               bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var]

    def compute():
        weight, bias, _ = folded_pointwise(dw_weight, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var,
                                           pw_weight, pw_bias, eps[0], cache)
        taps = dw_weight.reshape(dw_weight.shape[0], -1).t().contiguous()  # (K K, C)
        sign, magnitude, shift, _ = pool_affine(bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var, eps[1],
                                                cache)
        return weight, bias, taps, sign, magnitude, shift

    return cached_fold(cache, "native_operands", sources, compute)
