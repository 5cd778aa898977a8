"""f_dil and the per-frame classifier as one op, offline (``dilated_head``) and per streaming step
(``dilated_step_logits``), as functions of tensors beside their stock-torch ``_ref`` twins. The
streaming step's fast paths never write f_dil's (frames, C_out * W) output: on the CPU BN is folded into the
classifier (native or two GEMMs), on CUDA the Triton ring step adds each block of it into the
logits as it is computed (kernels.dilated_step_logits).

The layer (rtsed.models.layers.DilatedTemporal) passes f_dil's conv weight and bias, its BN's
affine and statistics (with the bookkeeping nn.BatchNorm2d would do), the classifier's weight and
bias, its ring buffer and write position, and its cache of folded weights (a plain dict,
rtsed.ops.fold): eval-mode paths fold BN into the classifier once and reuse the fold while the
parameters are unchanged. Each op asks rtsed.backends.dispatch once per call which implementation
runs (docs/fast-paths.md).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rtsed.backends import cpu_eval, cpu_head, dispatch
from rtsed.backends.cpu import fused_linear
from rtsed.backends.dispatch import CPU_TRAIN, FOLDED, NATIVE, TRITON
from rtsed.ops.dilated import dilated_step, dilated_step_ref, dilated_temporal, dilated_temporal_ref, ring_window
from rtsed.ops.fold import bn_affine, cached_fold
from rtsed.ops.launch import launcher


def _flatten(y: Tensor) -> Tensor:
    """(B, C_out, T, W) -> (B, T, C_out * W), channel-major (index c * W + w) as in the paper."""
    b, c, t, w = y.shape
    return y.permute(0, 2, 1, 3).reshape(b, t, c * w)


def _width(conv_weight: Tensor, channels: int, stride: int) -> int:
    return (channels - conv_weight.shape[2]) // stride + 1


def dilated_head(h: Tensor, conv_weight: Tensor, conv_bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                 bn_running_mean: Tensor | None, bn_running_var: Tensor | None, lin_weight: Tensor, lin_bias: Tensor,
                 *, dilation: int, stride: int, right_pad: int, training: bool, momentum: float, eps: float,
                 cache: dict | None = None) -> Tensor:
    """f_dil -> ReLU -> BN -> per-frame classifier: h (B, C, T, 1) CNN output -> logits
    (B, T, n_classes). Time padded by (K - 1) d - right_pad before and right_pad after. BN as
    ``F.batch_norm`` takes it (``training``: batch statistics, the running ones updated)."""
    how = dispatch.dilated_head(h, training, lin_weight, conv_weight, bn_weight)
    kernel = conv_weight.shape[2]
    context = (kernel - 1) * dilation
    if how == NATIVE:
        x = cpu_head.padded_frames(h, context - right_pad, right_pad)
        width = _width(conv_weight, h.shape[1], stride)
        weights = _packed_head(conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var, eps,
                               lin_weight, lin_bias, width, cache)
        return cpu_eval.dilated_head_logits(x, h.shape[2], weights, lin_weight.shape[0], kernel, dilation, stride)
    if how == CPU_TRAIN:
        return cpu_head.dilated_head(h, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var,
                                     lin_weight, lin_bias, dilation=dilation, stride=stride, right_pad=right_pad,
                                     training=training, momentum=momentum, eps=eps)
    return _composed(dilated_temporal, h, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var,
                     lin_weight, lin_bias, dilation, stride, right_pad, training, momentum, eps)


def dilated_head_ref(h: Tensor, conv_weight: Tensor, conv_bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                     bn_running_mean: Tensor | None, bn_running_var: Tensor | None, lin_weight: Tensor,
                     lin_bias: Tensor, *, dilation: int, stride: int, right_pad: int, training: bool, momentum: float,
                     eps: float, cache: dict | None = None) -> Tensor:
    """``dilated_head`` in stock torch (``cache`` unused: nothing is folded)."""
    return _composed(dilated_temporal_ref, h, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean,
                     bn_running_var, lin_weight, lin_bias, dilation, stride, right_pad, training, momentum, eps)


def _composed(conv_relu_bn: Callable, h, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var,
              lin_weight, lin_bias, dilation, stride, right_pad, training, momentum, eps) -> Tensor:
    """The reference composition, f_dil's conv -> ReLU -> BN by ``conv_relu_bn`` (the op, whose
    choice may be Triton, or its _ref twin), then the classifier."""
    context = (conv_weight.shape[2] - 1) * dilation
    x = h.permute(0, 3, 2, 1)  # (B, 1, T, C): CNN channels become the width axis
    x = F.pad(x, (0, 0, context - right_pad, right_pad))
    y = conv_relu_bn(x, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var,
                     dilation=dilation, stride=stride, training=training, momentum=momentum, eps=eps)
    return F.linear(_flatten(y), lin_weight, lin_bias)


def dilated_step_logits(h: Tensor, ring: Tensor, write_pos: int, conv_weight: Tensor, conv_bias: Tensor,
                        bn_weight: Tensor, bn_bias: Tensor, bn_running_mean: Tensor, bn_running_var: Tensor,
                        lin_weight: Tensor, lin_bias: Tensor, *, dilation: int, stride: int, eps: float,
                        cache: dict | None = None) -> Tensor:
    """A streaming step of f_dil (eval-mode BN) and the classifier: h (B, C, n, 1) new CNN frames
    -> logits (B, n, n_classes). Writes the frames into ring (B, capacity, C) from write_pos on;
    the caller advances its write position by n. Steps longer than capacity - (K - 1) d run in
    slices."""
    how = dispatch.dilated_step_logits(h, False, lin_weight, conv_weight, kernel=conv_weight.shape[2],
                                       classes=lin_weight.shape[0])
    if how == TRITON:
        return _step_logits_fused(h, ring, write_pos, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean,
                                  bn_running_var, lin_weight, lin_bias, dilation, stride, eps)
    if how == NATIVE:
        return _step_logits_native(h, ring, write_pos, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean,
                                   bn_running_var, lin_weight, lin_bias, dilation, stride, eps, cache)
    if how == FOLDED:
        return _step_logits_folded(h, ring, write_pos, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean,
                                   bn_running_var, lin_weight, lin_bias, dilation, stride, eps, cache)
    return _step_logits_composed(dilated_step, h, ring, write_pos, conv_weight, conv_bias, bn_weight, bn_bias,
                                 bn_running_mean, bn_running_var, lin_weight, lin_bias, dilation, stride, eps)


def dilated_step_logits_ref(h: Tensor, ring: Tensor, write_pos: int, conv_weight: Tensor, conv_bias: Tensor,
                            bn_weight: Tensor, bn_bias: Tensor, bn_running_mean: Tensor, bn_running_var: Tensor,
                            lin_weight: Tensor, lin_bias: Tensor, *, dilation: int, stride: int, eps: float,
                            cache: dict | None = None) -> Tensor:
    """``dilated_step_logits`` in stock torch (``cache`` unused)."""
    return _step_logits_composed(dilated_step_ref, h, ring, write_pos, conv_weight, conv_bias, bn_weight, bn_bias,
                                 bn_running_mean, bn_running_var, lin_weight, lin_bias, dilation, stride, eps)


def _slices(h: Tensor, ring: Tensor, write_pos: int, context: int):
    """(frames (B, m, C), write position) of each slice of a step that fits the ring."""
    frames = h[..., 0].transpose(1, 2)  # (B, n, C)
    capacity = ring.shape[1]
    max_step = capacity - context
    for i in range(0, frames.shape[1], max_step):
        part = frames[:, i:i + max_step]
        yield part, write_pos
        write_pos = (write_pos + part.shape[1]) % capacity


def _cat(outputs: list[Tensor]) -> Tensor:
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def _step_logits_composed(step: Callable, h, ring, write_pos, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean,
                          bn_running_var, lin_weight, lin_bias, dilation, stride, eps) -> Tensor:
    """f_dil's ring step by ``step`` (the op or its _ref twin), then the classifier."""
    context = (conv_weight.shape[2] - 1) * dilation
    outputs = [step(part, ring, pos, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var,
                    dilation=dilation, stride=stride, eps=eps)
               for part, pos in _slices(h, ring, write_pos, context)]
    return F.linear(_cat(outputs), lin_weight, lin_bias)


def _step_logits_fused(h, ring, write_pos, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean,
                       bn_running_var, lin_weight, lin_bias, dilation, stride, eps) -> Tensor:
    """f_dil's ring step and the classifier in one Triton launch per slice
    (kernels.dilated_step_logits): f_dil's (B, n, C_out * W) output is never written, so beyond
    the ring a step allocates O(B n n_classes) (10,000 streams x 16 frames: 10 MB, not 13.8 GB)."""
    step_logits = launcher("dilated_step_logits")
    context = (conv_weight.shape[2] - 1) * dilation
    return _cat([step_logits(part, ring, pos, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean,
                             bn_running_var, lin_weight, lin_bias, dilation=dilation, stride=stride, eps=eps)
                 for part, pos in _slices(h, ring, write_pos, context)])


def _step_logits_native(h, ring, write_pos, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean,
                        bn_running_var, lin_weight, lin_bias, dilation, stride, eps, cache) -> Tensor:
    """One native pass per ring window: conv, ReLU and the BN-folded classifier, the patches
    never copied and the conv's output never written."""
    kernel = conv_weight.shape[2]
    context = (kernel - 1) * dilation
    width = _width(conv_weight, ring.shape[2], stride)
    weights = _packed_head(conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var, eps,
                           lin_weight, lin_bias, width, cache)
    outputs = []
    for part, pos in _slices(h, ring, write_pos, context):
        window = ring_window(part, ring, pos, context)  # (B, (K - 1) d + n, C)
        outputs.append(cpu_eval.dilated_head_logits(window, window.shape[1] - context, weights, lin_weight.shape[0],
                                                    kernel, dilation, stride))
    return _cat(outputs)


def _step_logits_folded(h, ring, write_pos, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean,
                        bn_running_var, lin_weight, lin_bias, dilation, stride, eps, cache) -> Tensor:
    """Eval-mode step with BN folded into the classifier: two GEMMs per ring window."""
    k, d, s = conv_weight.shape[2], dilation, stride
    context = (k - 1) * d
    w = _width(conv_weight, ring.shape[2], stride)
    n_classes = lin_weight.shape[0]
    sources = [conv_weight, conv_bias, lin_weight, lin_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var]

    def compute():
        """The two GEMMs' weights, (out, in) as nn.Linear keeps them: conv (C_out, K K), its
        bias, and the BN-folded classifier reordered to (w, c) columns, (n_classes, W C_out)."""
        weight, folded_bias = folded_classifier(lin_weight, lin_bias, bn_weight, bn_bias, bn_running_mean,
                                                bn_running_var, eps, w, cache)
        c_out = conv_weight.shape[0]
        lin_wc = weight.view(-1, c_out, w).transpose(1, 2)
        return (conv_weight.reshape(c_out, -1).contiguous(), conv_bias,
                lin_wc.reshape(weight.shape[0], -1).contiguous(), folded_bias)

    weight, bias, lin_w, lin_b = cached_fold(cache, "patch_gemms", sources, compute)
    outputs = []
    for part, pos in _slices(h, ring, write_pos, context):
        window = ring_window(part, ring, pos, context)  # (B, (K - 1) d + n, C)
        b, t_in, _ = window.shape
        n = t_in - context
        # The conv as one GEMM over patches (B n W, K K) read straight off the window, rows
        # (b, t, w), columns (i, j) for tap window[b, t + i d, w S + j] (oneDNN's 1-channel
        # conv and the ReLU over its output layout took 3x longer at one thread).
        sb, st, sc = window.stride()
        patches = window.as_strided((b, n, w, k, k), (sb, st, s * sc, d * st, sc)).reshape(-1, k * k)
        r = fused_linear(patches, weight, bias, "relu")  # (B n W, C_out)
        logits = fused_linear(r.view(b * n, -1), lin_w, lin_b)  # (w, c) order on both sides
        outputs.append(logits.view(b, n, n_classes))
    return _cat(outputs)


def folded_classifier(lin_weight: Tensor, lin_bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                      bn_running_mean: Tensor, bn_running_var: Tensor, eps: float, width: int,
                      cache: dict | None = None) -> tuple[Tensor, Tensor]:
    """Eval mode: the classifier with f_dil's BN folded in (BN is a per-channel affine y = a r + b
    of r = ReLU(conv), and the classifier is linear in y): weight (n_classes, C_out * W) = L * a
    (channel-major), bias = l + L b. Cached in ``cache`` while its sources are unchanged."""
    sources = [lin_weight, lin_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var]

    def compute():
        scale, shift = bn_affine(bn_weight, bn_bias, bn_running_mean, bn_running_var, eps)
        lin = lin_weight.view(lin_weight.shape[0], bn_weight.shape[0], width)
        weight = (lin * scale[:, None]).reshape(lin_weight.shape[0], -1)
        return weight, lin_bias + torch.einsum("kcw,c->k", lin, shift)

    return cached_fold(cache, "classifier", sources, compute)


def _packed_head(conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var, eps, lin_weight,
                 lin_bias, width, cache):
    """The conv and the BN-folded classifier in the native head kernel's operand layout
    (rtsed.backends.native.head.head_logits_weights), cached."""
    sources = [conv_weight, conv_bias, lin_weight, lin_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var]

    def compute():
        folded, folded_bias = folded_classifier(lin_weight, lin_bias, bn_weight, bn_bias, bn_running_mean,
                                                bn_running_var, eps, width, cache)
        return cpu_eval.head_logits_weights(conv_weight, conv_bias, folded, folded_bias, width)

    return cached_fold(cache, "native_head", sources, compute)
