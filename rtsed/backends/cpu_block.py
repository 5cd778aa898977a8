"""A training-mode DWS block on the CPU: MKL/oneDNN for the GEMM and the convolution, native
fused passes (rtsed.backends.native) for everything between them.

The op is ``kernels/dws_block.py``'s (docs/reference.md "Depthwise-separable blocks")::

    d = depthwise(x); a = leaky(d, 0.01); u = BN1(a); p = pointwise(u); r = relu(p)
    z = BN2(r); out = max_pool(z, (1, P))          (batch statistics: training mode)

The reference (rtsed.ops.block.dws_block_ref) runs each elementwise step as its own
torch kernel, forward and backward, over full-resolution tensors: for block 1 of dnd_7_10 at batch
16 x 1024 each such pass moves hundreds of MB, and together they were a quarter of a train step
on a 2-core CPU. Here each is fused into as few passes as possible (channels-last; "rows" are
the B T F positions):

forward
  1. d = depthwise(x) (oneDNN), then one native pass: a = leaky(d) in place, BN1's sums; for
     block 1 (one input channel) conv, leaky and sums are one native pass.
  2. BN1 folds into the pointwise GEMM: p = a (W s1)^T + (b + W t1); u never exists. This GEMM
     and step 5's dp W run as oneDNN matmuls (``rtsed.backends.cpu.fused_linear``, faster than
     MKL's addmm at these shapes; the weight-gradient GEMM stays MKL's, which oneDNN ran slower).
  3. one native pass reads p: BN2's sums of relu(p), and the pool's pick of relu(p) per window
     (the max, or the min where BN2's scale is negative), writing only 1/P of full resolution;
     out = s2 picked + t2.
backward
  4. BN2's weight and bias grads from the pooled tensors; one native pass turns p into dL/dp in
     place (pool, BN2 with its batch terms, ReLU) and sums the pointwise bias grad.
  5. gu = dL/du = dp W (oneDNN), and dp^T a (MKL) for the pointwise weight grad, BN1 folded back out.
  6. native: BN1's sums of gu and gu a; native: gu -> dL/dd in place (BN1's backward, leaky's),
     summing the depthwise bias grad.
  7. native depthwise backward (weight grad, and x's for blocks 2-3) for K in 3/5/7, oneDNN's
     elsewhere.

Saved for backward: x, a and p (the reference keeps more), the pooled picks and their int8
positions. BN statistics are float64 sums of x and x^2 (rtsed.backends.batchnorm.mean_var_from_sums).
Parity with the reference (values, all gradients, running statistics) is tested in float64 to
~1e-10 and in float32 (tests/test_fast_block.py). Dropout2d stays outside the op:
rtsed.ops.block.dws_block applies it to the output, with the same random draws as the reference.
``dws_block_train`` takes tensors, with the arguments of ``kernels.dws_block.dws_block``, which
rtsed.ops.block.dws_block hands over as the layer gave them (rtsed.models.layers.DWSBlock.dws_arguments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rtsed.backends.native import block as native_block
from rtsed.backends.batchnorm import mean_var_from_sums, update_running_stats
from rtsed.backends.cpu import fused_linear
from rtsed.backends.dispatch import cpu_gemm_dtype

NEGATIVE_SLOPE = 0.01  # the inner LeakyReLU's (docs/reference.md)


def _channels_last_rows(t: Tensor) -> Tensor:
    """(B, C, T, F) -> its (B T F, C) rows, a view when t is channels-last (else a copy)."""
    b, c, frames, freq = t.shape
    rows = t.permute(0, 2, 3, 1)
    return (rows if rows.is_contiguous() else rows.contiguous()).view(b * frames * freq, c)


def _gemm_operand(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t if dtype is None else t.to(dtype)


def _gemm(x: Tensor, weight: Tensor, bias: Tensor, dtype: torch.dtype | None) -> Tensor:
    """x @ weight^T + bias, (rows, K) x (N, K) -> (rows, N) in x's original dtype; the operands
    in ``dtype`` when given (x already converted by the caller or here), float32 accumulation."""
    if dtype is None:
        return fused_linear(x, weight.contiguous(), bias)
    out_dtype = bias.dtype
    return torch.addmm(bias.to(dtype), x.to(dtype), weight.to(dtype).t()).to(out_dtype)


class DWSBlockTrainFunction(torch.autograd.Function):
    """x (B, C_in, T + K - 1, F) time-padded -> out (B, C, T, F // P), channels-last; see the
    module doc. Weights as the modules hold them: depthwise (C, 1, K, K) with C a multiple of
    C_in, pointwise (C, C, 1, 1). bn1/bn2: (running_mean, running_var, momentum, eps), running
    statistics updated in place (None: not tracked)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, x, dw_weight, dw_bias, bn1_weight, bn1_bias, pw_weight, pw_bias, bn2_weight, bn2_bias,
                bn1, bn2, pool, gemm_dtype):
        b, c_in, t_padded, freq = x.shape
        channels, kernel = dw_weight.shape[0], dw_weight.shape[-1]
        frames = t_padded - kernel + 1
        rows = b * frames * freq

        # 1. depthwise conv, channels-last (the weight restrided: with one input channel its
        # format cannot be read off its strides, docs/fast-paths.md), then leaky + BN1's sums.
        dw_weight_cl = dw_weight.detach().to(memory_format=torch.channels_last)
        if c_in == 1 and kernel in native_block.DEPTHWISE_KERNELS:  # block 1: one native pass
            x_padded = F.pad(x[:, 0], (kernel // 2, kernel // 2)).contiguous()  # (B, Tp, F + K - 1)
            a, total1, squares1 = native_block.conv1_leaky_stats(
                x_padded, dw_weight.detach().reshape(channels, kernel * kernel).contiguous(),
                dw_bias.detach().contiguous(), NEGATIVE_SLOPE)
            del x_padded
        else:
            d = F.conv2d(x, dw_weight_cl, dw_bias, padding=(0, kernel // 2), groups=c_in)
            a = _channels_last_rows(d)  # (rows, C), becomes leaky(d) in place
            del d
            total1, squares1 = native_block.act_stats(a, NEGATIVE_SLOPE, write=True)
        mean1, var1 = mean_var_from_sums(total1, squares1, rows)
        update_running_stats(bn1[0], bn1[1], mean1, var1, rows, bn1[2])
        rstd1 = torch.rsqrt(var1 + bn1[3]).to(x.dtype)
        mean1 = mean1.to(x.dtype)
        s1 = bn1_weight.detach() * rstd1
        t1 = bn1_bias.detach() - mean1 * s1

        # 2. the pointwise conv with BN1 folded in: W (s1 a + t1) + b = (W s1) a + (W t1 + b).
        w = pw_weight.detach().view(channels, channels)
        ctx.a_low = _gemm_operand(a, gemm_dtype)  # a in the GEMMs' dtype, kept for dp^T a
        p = _gemm(ctx.a_low, w * s1, torch.addmv(pw_bias.detach(), w, t1), gemm_dtype)  # (rows, C)

        # 3. BN2's sums and the pool's picks in one read of p.
        direction = torch.sign(bn2_weight.detach()).to(x.dtype).contiguous()  # sign of s2 = g2 / std
        picked, argpos, total2, squares2 = native_block.relu_stats_pool(p.view(b * frames, freq, channels), pool,
                                                                  direction)
        mean2, var2 = mean_var_from_sums(total2, squares2, rows)
        update_running_stats(bn2[0], bn2[1], mean2, var2, rows, bn2[2])
        rstd2 = torch.rsqrt(var2 + bn2[3]).to(x.dtype)
        mean2 = mean2.to(x.dtype)
        s2 = bn2_weight.detach() * rstd2
        out = torch.addcmul(bn2_bias.detach() - mean2 * s2, picked, s2)  # (B T, F // P, C)

        ctx.save_for_backward(x, dw_weight_cl, a, p, picked, argpos, w, s1, t1, mean1, rstd1, s2, mean2, rstd2)
        ctx.shape = (b, c_in, frames, freq, pool, kernel)
        ctx.gemm_dtype = gemm_dtype
        return out.view(b, frames, freq // pool, channels).permute(0, 3, 1, 2)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("DWSBlockTrainFunction's backward turns its saved activations into gradients "
                               "in place, so it runs once per forward: do not use retain_graph through it "
                               "(or set RTSED_KERNELS=ref)")
        ctx.consumed = True
        x, dw_weight_cl, a, p, picked, argpos, w, s1, t1, mean1, rstd1, s2, mean2, rstd2 = ctx.saved_tensors
        b, c_in, frames, freq, pool, kernel = ctx.shape
        gemm_dtype, a_low = ctx.gemm_dtype, ctx.a_low
        ctx.a_low = None
        channels = w.shape[0]
        rows = b * frames * freq
        need = ctx.needs_input_grad
        g = grad_out.permute(0, 2, 3, 1).contiguous().view(b * frames, freq // pool, channels)

        # 4. BN2: each pooled gradient lands on one picked value, so its weight and bias grads
        # come from the pooled tensors; dL/dr = s2 g + alpha2 + beta2 r carries the batch terms.
        d_bn2_bias = g.sum((0, 1))
        d_bn2_weight = ((g * picked).sum((0, 1)) - mean2 * d_bn2_bias) * rstd2
        beta2 = -s2 * d_bn2_weight * rstd2 / rows
        alpha2 = -s2 * d_bn2_bias / rows - beta2 * mean2
        dp = p.view(b * frames, freq, channels)
        d_pw_bias = native_block.relu_bn_pool_backward(dp, g, argpos, s2.contiguous(), alpha2.contiguous(),
                                                 beta2.contiguous(), pool).to(x.dtype)
        dp = p  # (rows, C), now dL/dp
        del g, picked, argpos

        # 5. the pointwise conv. Its input was u = s1 a + t1, so dL/dW = (dp^T a) s1 + dL/db t1^T.
        d_pw_weight = None
        dp_low = _gemm_operand(dp, gemm_dtype)
        if need[5]:
            d_pw_weight = (dp_low.t() @ a_low).to(x.dtype) * s1 + d_pw_bias[:, None] * t1
        del a_low
        gu = _gemm(dp_low, w.t(), torch.zeros_like(d_pw_bias), gemm_dtype)  # (rows, C): dL/du = dp W
        del dp_low
        del dp, p

        # 6. BN1 (batch statistics) and the leaky ReLU, in place on gu.
        total_g, total_ga = native_block.grad_sums(gu, a)
        d_bn1_bias = total_g.to(x.dtype)
        d_bn1_weight = (total_ga.to(x.dtype) - mean1 * d_bn1_bias) * rstd1
        beta1 = -s1 * d_bn1_weight * rstd1 / rows
        alpha1 = -s1 * d_bn1_bias / rows - beta1 * mean1
        d_dw_bias = native_block.leaky_bn_backward(gu, a, s1.contiguous(), alpha1.contiguous(), beta1.contiguous(),
                                             NEGATIVE_SLOPE).to(x.dtype)
        del a

        # 7. the depthwise conv's weight and input grads: native for K in 3/5/7 (oneDNN's
        # depthwise backward is slow on these CPUs), one-input-channel dx (never needed by the model:
        # block 1 reads the features) and other K through oneDNN.
        dd = gu.view(b, frames, freq, channels)  # (B, T, F, C)
        native_ok = kernel in native_block.DEPTHWISE_KERNELS
        half = kernel // 2
        d_x = d_dw_weight = None
        if need[1] and native_ok:
            x_padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, half, half)).contiguous()  # (B, Tp, F + K - 1, C_in)
            d_dw_weight = native_block.depthwise_weight_grad(dd, x_padded, kernel).view(channels, 1, kernel, kernel)
            del x_padded
        if need[0] and native_ok and c_in == channels:
            dd_padded = F.pad(dd, (0, 0, half, half, kernel - 1, kernel - 1))
            d_x = native_block.depthwise_input_grad(dd_padded, dw_weight_cl.reshape(channels, kernel * kernel).contiguous(),
                                                    kernel).permute(0, 3, 1, 2)
        mask = [need[0] and d_x is None, need[1] and d_dw_weight is None, False]
        if any(mask):
            dx_dnn, dw_dnn, _ = torch.ops.aten.convolution_backward(
                dd.permute(0, 3, 1, 2), x, dw_weight_cl, None, [1, 1], [0, half], [1, 1], False, [0, 0], c_in, mask)
            d_x = dx_dnn if mask[0] else d_x
            d_dw_weight = dw_dnn.contiguous() if mask[1] else d_dw_weight
        return (d_x, d_dw_weight, d_dw_bias, d_bn1_weight, d_bn1_bias,
                None if d_pw_weight is None else d_pw_weight.view(channels, channels, 1, 1), d_pw_bias,
                d_bn2_weight, d_bn2_bias, None, None, None, None)


def dws_block_train(x: Tensor, dw_weight: Tensor, dw_bias: Tensor, bn1_weight: Tensor, bn1_bias: Tensor,
                    bn1_running_mean: Tensor | None, bn1_running_var: Tensor | None, pw_weight: Tensor,
                    pw_bias: Tensor, bn2_weight: Tensor, bn2_bias: Tensor, bn2_running_mean: Tensor | None,
                    bn2_running_var: Tensor | None, *, pool: int, training: bool, momentum: tuple, eps: tuple) -> Tensor:
    """The DWS block in training mode (rtsed.backends.dispatch.cpu_block_applies), with the
    arguments of ``kernels.dws_block.dws_block`` (the layer's tensors, BN's bookkeeping done by
    the caller, momentum and eps as (inner, outer) pairs; ``training`` must be True):
    x (B, C_in, T + K - 1, F) -> (B, C, T, F // P), channels-last; dropout not included."""
    if not training:
        raise ValueError("dws_block_train runs BatchNorm on batch statistics only (training=True)")
    bn1 = (bn1_running_mean, bn1_running_var, momentum[0], eps[0])
    bn2 = (bn2_running_mean, bn2_running_var, momentum[1], eps[1])
    return DWSBlockTrainFunction.apply(x, dw_weight, dw_bias, bn1_weight, bn1_bias, pw_weight, pw_bias, bn2_weight,
                                       bn2_bias, bn1, bn2, pool, cpu_gemm_dtype(x))
