"""The CNN's frequency blocks as ops, functions of tensors: f_cnn's block (``conv_block``) and
f_dws's (``dws_block``), each on time-padded input and as a streaming step over the block's
history (``<op>_step``), each beside its stock-torch ``_ref`` twin.

The layer (rtsed.models.layers.ConvBlock, DWSBlock) passes its conv weights and biases, its
BatchNorms' affine and running statistics (with the bookkeeping nn.BatchNorm2d would do), the
pool size, its dropout probability and its cache of folded weights (a plain dict,
rtsed.ops.fold); nothing here sees a module. Each op asks rtsed.backends.dispatch once per call
which implementation runs (docs/fast-paths.md): in training the fused Triton kernel
(``kernels.dws_block.dws_block``, the launcher with ``dws_block``'s tensors) or the CPU autograd
function (rtsed.backends.cpu_block) for DWS blocks; in eval mode the native kernels
(rtsed.backends.cpu_eval) or the folded compositions (rtsed.ops.folded_block); else the
reference.

The structure the ops compute (docs/reference.md): the K x K convs zero-pad frequency by K // 2
and not time (the caller pads time: K - 1 - right_pad frames before, right_pad after), stride
and dilation 1; the max-pool is (1, P) with stride (1, P), dropping the last F mod P
frequencies; Dropout2d (p = ``dropout``) after the pool, on in training. BatchNorm as
``F.batch_norm`` takes it: ``training`` uses batch statistics and updates the running ones in
place with ``momentum``. A DWS block's ``momentum`` and ``eps`` are (inner, outer) pairs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rtsed.backends import cpu_block, cpu_eval, dispatch
from rtsed.backends.cpu import conv2d_like_input
from rtsed.backends.dispatch import CPU_TRAIN, FOLDED, FOLDED_EXPORT, NATIVE, TRITON
from rtsed.ops.folded_block import NEGATIVE_SLOPE, conv_block_folded, dws_block_folded, native_operands
from rtsed.ops.launch import launcher


def _conv_ref(x: Tensor, weight: Tensor, bias: Tensor, padding: tuple[int, int], groups: int) -> Tensor:
    """The stock conv the reference twins run (stride and dilation 1)."""
    return F.conv2d(x, weight, bias, 1, padding, 1, groups)


def _pool_dropout(z: Tensor, pool: int, dropout: float, training: bool) -> Tensor:
    """max-pool (1, P) then Dropout2d, as nn.MaxPool2d and nn.Dropout2d call them (the same
    random draws)."""
    return F.dropout2d(F.max_pool2d(z, (1, pool), (1, pool)), dropout, training)


def advance_history(x: Tensor, history: Tensor) -> Tensor:
    """cat(history, x) over time, (B, C_in, H + n, F), with history (B, C_in, H, F) advanced in
    place to that window's last H frames: a block's streaming state, whose zeros at the start
    of a stream are the offline left padding."""
    window = torch.cat([history, x], dim=2)
    if history.shape[2]:
        history.copy_(window[:, :, window.shape[2] - history.shape[2]:])
    return window


# ---------------------------------------------------------------------------------------- f_cnn


def conv_block(x: Tensor, conv_weight: Tensor, conv_bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
               bn_running_mean: Tensor | None, bn_running_var: Tensor | None, *, pool: int, training: bool,
               momentum: float, eps: float, dropout: float, cache: dict | None = None) -> Tensor:
    """f_cnn's block: conv (C_in -> C_out, K x K, bias) -> ReLU -> BN -> max-pool (1, P) ->
    Dropout2d. x (B, C_in, T + K - 1, F) time-padded -> (B, C_out, T, F // P)."""
    how = dispatch.frequency_block(x, False, training, conv_weight.shape[-1], conv_weight.shape[0], pool)
    return _conv_block(how, x, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var,
                       pool, training, momentum, eps, dropout, cache)


def conv_block_ref(x: Tensor, conv_weight: Tensor, conv_bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                   bn_running_mean: Tensor | None, bn_running_var: Tensor | None, *, pool: int, training: bool,
                   momentum: float, eps: float, dropout: float, cache: dict | None = None) -> Tensor:
    """``conv_block`` in stock torch (``cache`` unused: nothing is folded)."""
    return _conv_composed(_conv_ref, x, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var,
                          pool, training, momentum, eps, dropout)


def conv_block_step(x: Tensor, history: Tensor, conv_weight: Tensor, conv_bias: Tensor, bn_weight: Tensor,
                    bn_bias: Tensor, bn_running_mean: Tensor | None, bn_running_var: Tensor | None, *, pool: int,
                    training: bool, momentum: float, eps: float, dropout: float,
                    cache: dict | None = None) -> Tensor:
    """A streaming step of ``conv_block``: x (B, C_in, n, F) new frames, history (B, C_in, K - 1, F)
    the frames before them -> (B, C_out, n, F // P), the block on cat(history, x); history
    advances in place to that window's last K - 1 frames."""
    how = dispatch.frequency_block(x, False, training, conv_weight.shape[-1], conv_weight.shape[0], pool)
    return _conv_block(how, advance_history(x, history), conv_weight, conv_bias, bn_weight, bn_bias,
                       bn_running_mean, bn_running_var, pool, training, momentum, eps, dropout, cache)


def conv_block_step_ref(x: Tensor, history: Tensor, conv_weight: Tensor, conv_bias: Tensor, bn_weight: Tensor,
                        bn_bias: Tensor, bn_running_mean: Tensor | None, bn_running_var: Tensor | None, *,
                        pool: int, training: bool, momentum: float, eps: float, dropout: float,
                        cache: dict | None = None) -> Tensor:
    """``conv_block_step`` in stock torch."""
    return conv_block_ref(advance_history(x, history), conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean,
                          bn_running_var, pool=pool, training=training, momentum=momentum, eps=eps, dropout=dropout)


def _conv_block(how: str, x, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var, pool,
                training, momentum, eps, dropout, cache) -> Tensor:
    if how in (FOLDED, FOLDED_EXPORT):
        return conv_block_folded(x, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var,
                                 pool=pool, eps=eps, export=how == FOLDED_EXPORT, cache=cache)
    return _conv_composed(conv2d_like_input, x, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean,
                          bn_running_var, pool, training, momentum, eps, dropout)


def _conv_composed(conv: Callable, x, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var,
                   pool, training, momentum, eps, dropout) -> Tensor:
    """The reference composition, the conv by ``conv`` (the layout-aware one, or the stock one
    of the _ref twin: the same values)."""
    y = conv(x, conv_weight, conv_bias, (0, conv_weight.shape[-1] // 2), 1)
    z = F.batch_norm(F.relu(y), bn_running_mean, bn_running_var, bn_weight, bn_bias, training, momentum, eps)
    return _pool_dropout(z, pool, dropout, training)


# ---------------------------------------------------------------------------------------- f_dws


def dws_block(x: Tensor, dw_weight: Tensor, dw_bias: Tensor, bn1_weight: Tensor, bn1_bias: Tensor,
              bn1_running_mean: Tensor | None, bn1_running_var: Tensor | None, pw_weight: Tensor, pw_bias: Tensor,
              bn2_weight: Tensor, bn2_bias: Tensor, bn2_running_mean: Tensor | None,
              bn2_running_var: Tensor | None, *, pool: int, training: bool, momentum: tuple, eps: tuple,
              dropout: float, cache: dict | None = None) -> Tensor:
    """f_dws's block: depthwise conv (C_in -> C, K x K, groups C_in: block 1's C_in = 1 is a plain
    1 -> C conv) -> LeakyReLU(0.01) -> BN1 -> pointwise conv (C -> C, 1 x 1) -> ReLU -> BN2 ->
    max-pool (1, P) -> Dropout2d. x (B, C_in, T + K - 1, F) time-padded -> (B, C, T, F // P).
    The tensors are those of ``kernels.dws_block.dws_block``, in its order."""
    how = dispatch.frequency_block(x, True, training, dw_weight.shape[-1], dw_weight.shape[0], pool, dw_weight,
                                   dw_bias, bn1_weight, bn1_bias, pw_weight, pw_bias, bn2_weight, bn2_bias)
    return _dws_block(how, x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var,
                      pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var, pool, training,
                      momentum, eps, dropout, cache)


def dws_block_ref(x: Tensor, dw_weight: Tensor, dw_bias: Tensor, bn1_weight: Tensor, bn1_bias: Tensor,
                  bn1_running_mean: Tensor | None, bn1_running_var: Tensor | None, pw_weight: Tensor,
                  pw_bias: Tensor, bn2_weight: Tensor, bn2_bias: Tensor, bn2_running_mean: Tensor | None,
                  bn2_running_var: Tensor | None, *, pool: int, training: bool, momentum: tuple, eps: tuple,
                  dropout: float, cache: dict | None = None) -> Tensor:
    """``dws_block`` in stock torch (``cache`` unused: nothing is folded)."""
    return _dws_composed(_conv_ref, x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var,
                         pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var, pool,
                         training, momentum, eps, dropout)


def dws_block_step(x: Tensor, history: Tensor, dw_weight: Tensor, dw_bias: Tensor, bn1_weight: Tensor,
                   bn1_bias: Tensor, bn1_running_mean: Tensor | None, bn1_running_var: Tensor | None,
                   pw_weight: Tensor, pw_bias: Tensor, bn2_weight: Tensor, bn2_bias: Tensor,
                   bn2_running_mean: Tensor | None, bn2_running_var: Tensor | None, *, pool: int, training: bool,
                   momentum: tuple, eps: tuple, dropout: float, cache: dict | None = None) -> Tensor:
    """A streaming step of ``dws_block``: x (B, C_in, n, F) new frames, history (B, C_in, K - 1, F)
    the frames before them -> (B, C, n, F // P), the block on cat(history, x); history advances
    in place to that window's last K - 1 frames. The native kernels read history and x where
    they lie; the other implementations run on their concatenation."""
    how = dispatch.frequency_block(x, True, training, dw_weight.shape[-1], dw_weight.shape[0], pool, dw_weight,
                                   dw_bias, bn1_weight, bn1_bias, pw_weight, pw_bias, bn2_weight, bn2_bias)
    if how == NATIVE:  # (the window would have x's device, dtype and autograd: one decision serves both)
        return _dws_native(x, history, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var,
                           pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var, pool, eps,
                           cache)
    return _dws_block(how, advance_history(x, history), dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_running_mean,
                      bn1_running_var, pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var,
                      pool, training, momentum, eps, dropout, cache)


def dws_block_step_ref(x: Tensor, history: Tensor, dw_weight: Tensor, dw_bias: Tensor, bn1_weight: Tensor,
                       bn1_bias: Tensor, bn1_running_mean: Tensor | None, bn1_running_var: Tensor | None,
                       pw_weight: Tensor, pw_bias: Tensor, bn2_weight: Tensor, bn2_bias: Tensor,
                       bn2_running_mean: Tensor | None, bn2_running_var: Tensor | None, *, pool: int,
                       training: bool, momentum: tuple, eps: tuple, dropout: float,
                       cache: dict | None = None) -> Tensor:
    """``dws_block_step`` in stock torch."""
    return dws_block_ref(advance_history(x, history), dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_running_mean,
                         bn1_running_var, pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_running_mean,
                         bn2_running_var, pool=pool, training=training, momentum=momentum, eps=eps, dropout=dropout)


def _dws_block(how: str, x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var, pw_weight,
               pw_bias, bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var, pool, training, momentum, eps,
               dropout, cache) -> Tensor:
    tensors = (dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var, pw_weight, pw_bias,
               bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var)
    if how == NATIVE:
        return _dws_native(x, None, *tensors, pool, eps, cache)
    if how in (FOLDED, FOLDED_EXPORT):
        return dws_block_folded(x, *tensors, pool=pool, eps=eps, export=how == FOLDED_EXPORT, cache=cache)
    if how in (CPU_TRAIN, TRITON):
        fused = cpu_block.dws_block_train if how == CPU_TRAIN else launcher("dws_block")
        out = fused(x, *tensors, pool=pool, training=training, momentum=momentum, eps=eps)
        return F.dropout2d(out, dropout, training)  # nn.Dropout2d's call: the same draws
    return _dws_composed(conv2d_like_input, x, *tensors, pool, training, momentum, eps, dropout)


def _dws_native(x, history, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var, pw_weight,
                pw_bias, bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var, pool, eps, cache) -> Tensor:
    """The native kernels on the folded operands (cached), reading ``history`` (None offline)
    and x in place and advancing history."""
    weight, bias, taps, sign, magnitude, shift = native_operands(
        dw_weight, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var, pw_weight, pw_bias, bn2_weight, bn2_bias,
        bn2_running_mean, bn2_running_var, eps, cache)
    return cpu_eval.dws_block(x, (weight, bias, taps, dw_bias, sign, magnitude, shift), dw_weight.shape[-1], pool,
                              history, advance_history=history is not None)


def _dws_composed(conv: Callable, x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var,
                  pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var, pool, training,
                  momentum, eps, dropout) -> Tensor:
    """The reference composition, the convs by ``conv`` (the layout-aware one, or the stock one
    of the _ref twin: the same values)."""
    d = conv(x, dw_weight, dw_bias, (0, dw_weight.shape[-1] // 2), x.shape[1])
    u = F.batch_norm(F.leaky_relu(d, NEGATIVE_SLOPE), bn1_running_mean, bn1_running_var, bn1_weight, bn1_bias,
                     training, momentum[0], eps[0])
    p = conv(u, pw_weight, pw_bias, (0, 0), 1)
    z = F.batch_norm(F.relu(p), bn2_running_mean, bn2_running_var, bn2_weight, bn2_bias, training, momentum[1],
                     eps[1])
    return _pool_dropout(z, pool, dropout, training)
