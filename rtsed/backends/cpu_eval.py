"""Eval-mode CPU paths through rtsed.backends.native's inference kernels (dispatch's "native"):
the folded DWS block, and f_dil + ReLU + the BN-folded classifier from CNN frames to logits.
They take folded operands (rtsed.ops.folded_block.native_operands for the block; rtsed.ops.head
packs f_dil's with ``head_logits_weights``) and compute what the folded torch paths compute.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rtsed.backends.cpu import fused_linear
from rtsed.backends.native import eval_block
from rtsed.backends.native import head as native_head

head_logits_weights = native_head.head_logits_weights  # the packer rtsed.ops.dilated_head caches its fold with


def dws_block(x: Tensor, operands: tuple[Tensor, ...], kernel: int, pool: int, history: Tensor | None = None,
              advance_history: bool = False) -> Tensor:
    """The folded DWS block as three passes over channels-last rows: the native K x K conv +
    LeakyReLU (reading history and x in place, then advancing history when asked), the pointwise
    GEMM with the inner BN folded in (oneDNN, ``fused_linear``), and the native ReLU + output-BN
    affine + max-pool. Same arithmetic as rtsed.ops.folded_block.dws_block_folded (either sign of
    the BN scales).

    x: (B, C_in, T + K - 1, F) -> (B, C_out, T, F // P); or, given ``history`` (B, C_in, H, F), the
    same on cat(history, x) without building it, with ``advance_history`` history advanced in
    place to the window's last H frames. operands: (pointwise weight (C, C) and bias (C,) with the
    inner BN folded in, depthwise taps (K K, C) and bias (C,), the output BN's sign, magnitude
    and shift, each (C, 1, 1)), as rtsed.ops.block passes them."""
    weight, bias, taps, dw_bias, sign, magnitude, shift = operands
    # (B, C, T, F) -> (B, T, F, C): a view for channels-last (and one-channel) tensors
    frames = x.permute(0, 2, 3, 1).contiguous()
    past = None if history is None else history.permute(0, 2, 3, 1)  # a view of a channels-last state
    if past is not None and not past.is_contiguous():  # (a state the kernel cannot advance in place)
        a = eval_block.depthwise_conv_leaky(frames, taps, dw_bias, kernel, 0.01, past.contiguous())
        if advance_history:
            history.copy_(torch.cat([history, x], dim=2)[:, :, x.shape[2]:])
    else:
        a = eval_block.depthwise_conv_leaky(frames, taps, dw_bias, kernel, 0.01, past,
                                            advance_history)  # (B, T, F, C)
    b, t, f, c = a.shape
    y = fused_linear(a.view(-1, c), weight, bias)
    pooled = eval_block.pool_relu_affine(y.view(b * t, f, c), pool, sign, magnitude, shift)
    return pooled.view(b, t, -1, c).permute(0, 3, 1, 2)


def dilated_head_logits(window: Tensor, frames: int, weights, n_classes: int, kernel: int, dilation: int,
                        stride: int) -> Tensor:
    """f_dil's conv, ReLU and the BN-folded classifier in one native pass per frame tile, so
    nothing of f_dil's output is written: window (B, (K - 1) d + n, C) contiguous -> logits
    (B, n, n_classes) for its last ``frames`` = n frames. weights: ``head_logits_weights(...)`` of f_dil's
    conv and the BN-folded classifier."""
    return native_head.head_logits(window, frames, weights, n_classes, kernel, dilation, stride)
