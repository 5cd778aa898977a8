"""One streaming step of f_dil over its ring buffer of past input frames (eval mode only).

Op (``dilated_step_ref`` is the twin in stock torch; ``rtsed.ops.dilated_step_ref`` the one the
layers' reference step runs)::

    ring[:, (write_pos + j) % capacity] = frames[:, j]                      j < n, in place
    tap k of new frame j = ring[:, (write_pos + j - (K - 1 - k) d) % capacity]   k < K
    y[b, j, c * W + w] = BN_eval(relu(conv over the K taps x K channels from w S))[c]

Shapes: frames (B, n, C) new input frames (CNN channels), ring (B, capacity, C) with
capacity >= (K - 1) d + n (so a new frame never overwrites a frame that another new frame still
reads); output (B, n, C_out * W), channel-major per frame (c * W + w) as the classifier reads it,
W = (C - K) // S + 1. The caller advances the write position by n afterwards
(``DilatedTemporal.step`` does it on its FrameRing; rtsed.ops.dilated_step calls the launcher).

How it runs: the new frames are written with at most two slice copies (the ring may wrap), then
one kernel computes every output row (b, j, w): its K x K patch is gathered from the ring with the
slot arithmetic above (nothing shifted, O(n) work whatever d), p = patch @ weight^T + bias by
tl.dot (kernels.dilated_temporal's tile helpers), relu, and BN folded from the running statistics
inside the kernel (scale = gamma / sqrt(var + eps), shift = beta - mean scale), so a step is two
small copies and one launch. fp32 accumulation, every load masked.

Limits: eval-mode BatchNorm (running statistics) only; ring and frames float32 or float16 (same
dtype); CUDA tensors, or CPU tensors when kernels.dilated_temporal was imported under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import dilated_temporal as _dt
from kernels.dilated_temporal import _conv_tile, _row_coords

# As in kernels.dilated_temporal: what the decorators below saw. The helpers imported from there
# must have been decorated the same way (both interpreted, or both compiled).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _ring_taps(write_pos, j, CAP, DIL, K: tl.constexpr, KK_PAD: tl.constexpr):
    """The K x K taps of new frames j (length F), padded to KK_PAD: each frame's ring slot per tap,
    slot[F, KK_PAD] = (write_pos + j - (K - 1 - kt) DIL) mod CAP, the tap index k (padding taps read
    tap 0), its channel offset kc = k % K and its mask."""
    k = tl.arange(0, KK_PAD)
    kmask = k < K * K
    k = tl.where(kmask, k, 0)
    kt = k // K
    kc = k % K
    # (K - 1) d < CAP, so adding CAP keeps the slot numerator non-negative.
    slot = (write_pos + j[:, None] - (K - 1 - kt[None, :]) * DIL + CAP) % CAP
    return slot, k, kc, kmask


@triton.jit(do_not_specialize=["write_pos"])  # it changes every step: one compiled variant for all
def _dilated_step_kernel(ring_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, rm_ptr, rv_ptr, out_ptr,
                         n_rows, N, W, C_out, CAP, write_pos, srb, srt, src, S, DIL, eps,
                         K: tl.constexpr, KK_PAD: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_CO: tl.constexpr):
    """Rows (b, j, w) of one tile, all output channels: out[b, j, co * W + w]."""
    r, rmask, b, j, w = _row_coords(tl.program_id(0), n_rows, N, W, BLOCK_R)
    slot, k, kc, kmask = _ring_taps(write_pos, j, CAP, DIL, K, KK_PAD)
    chan = (w * S)[:, None] + kc[None, :]
    off = (b.to(tl.int64) * srb)[:, None] + slot.to(tl.int64) * srt + chan.to(tl.int64) * src
    patch = tl.load(ring_ptr + off, mask=rmask[:, None] & kmask[None, :], other=0.0)
    orow = (b * N + j).to(tl.int64) * C_out * W + w
    for co0 in range(0, C_out, BLOCK_CO):
        co = co0 + tl.arange(0, BLOCK_CO)
        comask = co < C_out
        p, wt = _conv_tile(patch, w_ptr, b_ptr, co, comask, K, KK_PAD, PREC)
        gamma = tl.load(gamma_ptr + co, mask=comask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + co, mask=comask, other=0.0).to(tl.float32)
        mean = tl.load(rm_ptr + co, mask=comask, other=0.0).to(tl.float32)
        var = tl.load(rv_ptr + co, mask=comask, other=1.0).to(tl.float32)
        scale = gamma / tl.sqrt(var + eps)
        shift = beta - mean * scale
        y = tl.maximum(p, 0.0) * scale[None, :] + shift[None, :]
        tl.store(out_ptr + orow[:, None] + co.to(tl.int64)[None, :] * W, y.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & comask[None, :])


def _write_ring(ring: torch.Tensor, frames: torch.Tensor, write_pos: int) -> None:
    """ring[:, (write_pos + j) % capacity] = frames[:, j]: one slice copy, two where it wraps."""
    n, capacity = frames.shape[1], ring.shape[1]
    first = min(n, capacity - write_pos)
    ring[:, write_pos:write_pos + first].copy_(frames[:, :first])
    if first < n:
        ring[:, :n - first].copy_(frames[:, first:])


def _check(frames, ring, write_pos, weight, dilation, stride) -> None:
    if frames.dim() != 3 or ring.dim() != 3 or frames.shape[0] != ring.shape[0] or frames.shape[2] != ring.shape[2]:
        raise ValueError(f"frames (B, n, C) and ring (B, capacity, C) disagree: {tuple(frames.shape)}, "
                         f"{tuple(ring.shape)}")
    if ring.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"dilated_step runs in float32 or float16, got {ring.dtype}")
    if _INTERPRETED != _dt._INTERPRETED:
        raise RuntimeError("kernels.dilated_step and kernels.dilated_temporal were imported under different "
                           "TRITON_INTERPRET settings: import (or reload) both under the same one")
    if not ring.is_cuda and not _INTERPRETED:
        raise RuntimeError(f"dilated_step's Triton kernel needs CUDA tensors (got {ring.device}), or "
                           "TRITON_INTERPRET=1 set before kernels.dilated_temporal is imported")
    K = weight.shape[2]
    capacity = ring.shape[1]
    if frames.shape[1] + (K - 1) * dilation > capacity:
        raise ValueError(f"{frames.shape[1]} new frames do not fit a ring of {capacity} with "
                         f"{(K - 1) * dilation} frames of context: step in slices")
    if not 0 <= write_pos < capacity:
        raise ValueError(f"write_pos {write_pos} outside [0, {capacity})")
    if K > ring.shape[2] or stride < 1 or dilation < 1:
        raise ValueError(f"bad geometry: K={K}, C={ring.shape[2]}, stride={stride}, dilation={dilation}")


def dilated_step(frames, ring, write_pos: int, weight, bias, bn_weight, bn_bias, bn_running_mean,
                 bn_running_var, *, dilation: int, stride: int, eps: float = 1e-5) -> torch.Tensor:
    """Write frames (B, n, C) into ring (B, capacity, C) at write_pos (in place) and return the
    outputs for them, (B, n, C_out * W), channel-major per frame. Eval-mode BN."""
    _check(frames, ring, write_pos, weight, dilation, stride)
    B, n, C = frames.shape
    C_out, _, K, _ = weight.shape
    W = (C - K) // stride + 1
    _write_ring(ring, frames, write_pos)
    out = torch.empty(B, n, C_out * W, device=ring.device, dtype=ring.dtype)
    if n == 0:
        return out
    cfg = _dt._config(ring, C_out)
    w2 = weight.detach().reshape(C_out, K * K).to(ring.dtype).contiguous()
    b = _dt._vec(bias, C_out, 0.0, ring)
    gamma = _dt._vec(bn_weight, C_out, 1.0, ring)
    beta = _dt._vec(bn_bias, C_out, 0.0, ring)
    n_rows = B * n * W
    srb, srt, src = ring.stride()
    # One tile of rows covers several frames of a step; small steps need small tiles, not 128 rows.
    block_r = min(cfg.block_r, max(16, triton.next_power_of_2(n_rows)))
    _dilated_step_kernel[(triton.cdiv(n_rows, block_r),)](
        ring, w2, b, gamma, beta, bn_running_mean.detach(), bn_running_var.detach(), out,
        n_rows, n, W, C_out, ring.shape[1], write_pos, srb, srt, src, stride, dilation, float(eps),
        K=K, KK_PAD=_dt._kk_pad(K), PREC=_dt._dot_precision(ring), BLOCK_R=block_r,
        BLOCK_CO=cfg.block_co, num_warps=cfg.warps)
    return out


def dilated_step_ref(frames, ring, write_pos: int, weight, bias, bn_weight, bn_bias, bn_running_mean,
                     bn_running_var, *, dilation: int, stride: int, eps: float = 1e-5) -> torch.Tensor:
    """The same step in stock torch (the arithmetic of ``rtsed.ops.dilated_step_ref``)."""
    B, n, C = frames.shape
    K = weight.shape[2]
    capacity = ring.shape[1]
    _write_ring(ring, frames, write_pos)
    j = torch.arange(n, device=ring.device)
    offsets = (torch.arange(K, device=ring.device) - (K - 1)) * dilation
    slots = (write_pos + j[:, None] + offsets[None, :]) % capacity  # (n, K)
    taps = ring[:, slots.reshape(-1)].reshape(B * n, 1, K, C)
    y = F.conv2d(taps, weight, bias, stride=(1, stride))  # taps already spaced by d: undilated
    y = F.batch_norm(F.relu(y), bn_running_mean, bn_running_var, bn_weight, bn_bias, False, 0.0, eps)
    return y.reshape(B, n, -1)
