"""f_dil's ops as functions of tensors: the dilated conv -> ReLU -> BN offline
(``dilated_temporal``) and one streaming step over the ring buffer of past frames
(``dilated_step``), each beside its stock-torch twin ``<op>_ref``; and the ring's two ways of
reading a step's input (``ring_taps``, ``ring_window``).

Weights, BatchNorm affine and statistics, the ring and its write position come in as tensors
and numbers (the layer, rtsed.models.layers.DilatedTemporal, passes its own); nothing here sees a
module. Each op asks rtsed.backends.dispatch once per call which implementation runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rtsed.backends import dispatch
from rtsed.backends.dispatch import TRITON
from rtsed.ops.launch import launcher


def dilated_temporal(x: Tensor, weight: Tensor, bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                     bn_running_mean: Tensor | None, bn_running_var: Tensor | None, *, dilation: int, stride: int,
                     training: bool, momentum: float, eps: float) -> Tensor:
    """BN(relu(conv2d(x, weight, bias, stride (1, S), dilation (d, 1)))): x (B, 1, T + (K - 1) d, C)
    time-padded -> (B, C_out, T, W). BN as ``F.batch_norm`` takes it (training: batch statistics,
    the running ones updated in place with ``momentum``). Triton where dispatch says so, else the
    reference."""
    how = dispatch.dilated_temporal(x, weight.shape[0], weight.shape[2], stride)
    op = launcher("dilated_temporal") if how == TRITON else dilated_temporal_ref
    return op(x, weight, bias, bn_weight, bn_bias, bn_running_mean, bn_running_var, dilation=dilation,
              stride=stride, training=training, momentum=momentum, eps=eps)


def dilated_temporal_ref(x: Tensor, weight: Tensor, bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                         bn_running_mean: Tensor | None, bn_running_var: Tensor | None, *, dilation: int,
                         stride: int, training: bool, momentum: float, eps: float) -> Tensor:
    """``dilated_temporal`` in stock torch."""
    y = F.conv2d(x, weight, bias, stride=(1, stride), dilation=(dilation, 1))
    return F.batch_norm(F.relu(y), bn_running_mean, bn_running_var, bn_weight, bn_bias, training, momentum, eps)


def dilated_step(frames: Tensor, ring: Tensor, write_pos: int, weight: Tensor, bias: Tensor, bn_weight: Tensor,
                 bn_bias: Tensor, bn_running_mean: Tensor, bn_running_var: Tensor, *, dilation: int, stride: int,
                 eps: float) -> Tensor:
    """One streaming step of f_dil (eval-mode BN): writes frames (B, n, C) into ring
    (B, capacity, C) from slot write_pos on (in place; the caller advances its write position by
    n) and returns (B, n, C_out * W) for them, channel-major per frame. n <= capacity - (K - 1) d."""
    how = dispatch.dilated_step(frames, weight.shape[0], weight.shape[2], stride)
    op = launcher("dilated_step") if how == TRITON else dilated_step_ref
    return op(frames, ring, write_pos, weight, bias, bn_weight, bn_bias, bn_running_mean, bn_running_var,
              dilation=dilation, stride=stride, eps=eps)


def dilated_step_ref(frames: Tensor, ring: Tensor, write_pos: int, weight: Tensor, bias: Tensor, bn_weight: Tensor,
                     bn_bias: Tensor, bn_running_mean: Tensor, bn_running_var: Tensor, *, dilation: int, stride: int,
                     eps: float) -> Tensor:
    """``dilated_step`` in stock torch: each new frame's K taps gathered from the ring (already
    spaced by d, so the conv runs undilated over them), conv, ReLU, eval-mode BN."""
    b, n, _ = frames.shape
    taps = ring_taps(frames, ring, write_pos, weight.shape[2], dilation)
    y = F.conv2d(taps, weight, bias, stride=(1, stride))  # (B n, C_out, 1, W)
    y = F.batch_norm(F.relu(y), bn_running_mean, bn_running_var, bn_weight, bn_bias, False, 0.0, eps)
    return y.reshape(b, n, -1)  # (B n, C_out, 1, W) is already channel-major per frame


def ring_taps(frames: Tensor, ring: Tensor, write_pos: int, kernel: int, dilation: int) -> Tensor:
    """Write frames (B, n, C) into ring at write_pos and gather each new frame's K taps, already
    spaced by d: (B * n, 1, K, C). The caller advances its write position by n."""
    b, n, c = frames.shape
    capacity = ring.shape[1]
    device = frames.device
    new_slots = (write_pos + torch.arange(n, device=device)) % capacity
    ring[:, new_slots] = frames
    # Tap k of output j reads the frame (K - 1 - k) * d steps before input frame j.
    offsets = (torch.arange(kernel, device=device) - (kernel - 1)) * dilation
    tap_slots = (write_pos + torch.arange(n, device=device)[:, None] + offsets[None, :]) % capacity
    return ring[:, tap_slots.reshape(-1)].reshape(b * n, 1, kernel, c)


def ring_window(frames: Tensor, ring: Tensor, write_pos: int, context: int) -> Tensor:
    """Write frames (B, n, C) into ring at write_pos and return the ``context`` = (K - 1) d past
    frames and the n new ones in time order, (B, context + n, C): a view of the ring where that
    span does not wrap round its end, else a copy of its two pieces. The caller advances its
    write position by n."""
    n = frames.shape[1]
    capacity = ring.shape[1]
    first = min(n, capacity - write_pos)
    ring[:, write_pos:write_pos + first] = frames[:, :first]
    if first < n:
        ring[:, :n - first] = frames[:, first:]
    start = write_pos - context
    stop = start + context + n
    if start >= 0 and stop <= capacity:
        return ring[:, start:stop]
    return torch.cat([ring[:, start % capacity:], ring[:, :stop % capacity]], dim=1)
