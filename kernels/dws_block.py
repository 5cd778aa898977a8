"""Fused depthwise-separable (DWS) block of f_dws: one op from the time-padded input to the pooled output.

Op (docs/reference.md "Depthwise-separable blocks"; ``dws_block_ref`` is the twin in stock torch)::

    d = depthwise(x)            Conv2d(C_in -> C, K x K, groups=C_in, freq padding K // 2, no time padding)
    u = BN1(leaky_relu(d, 0.01))
    p = pointwise(u)            Conv2d(C -> C, 1 x 1, bias)
    z = BN2(relu(p))
    out = max_pool(z, (1, P))   floor: the last F mod P frequencies are dropped

Shapes: x (B, C_in, T + K - 1, F) -> out (B, C, T, F // P). Weights: depthwise (C, 1, K, K) with
C a multiple of C_in (block 1: C_in = 1, depth multiplier C; blocks 2-3: C_in = C, true
depthwise), pointwise (C, C, 1, 1). Dropout2d is NOT part of the op: rtsed.ops applies the
block's Dropout2d to the pooled output (same RNG draws as the reference path).

How it runs (a tile is BLOCK_R rows of (b, t, f) positions x a block of channels; every kernel
that needs the depthwise output d recomputes it from x (25 FMAs per element) rather than reading a
stored full-resolution tensor; the pointwise is a tl.dot over blocks of depthwise channels; fp32
accumulation; every load masked; no atomics, so results are deterministic):

- eval-mode BN / inference: one kernel, ``_dws_fwd_kernel``. BN1 is folded into a per-channel
  affine after the leaky ReLU, BN2 into one after the ReLU; the tile loops over the P positions
  of a pool window keeping a running maximum of the BN2 output, so only the pooled output is
  written. BN2 is applied per element before the max, which is exact for either sign of its
  scale (a negative scale makes the max over relu(p) a min), at P FMAs per output, nothing next
  to the dot.
- training (batch statistics): ``_dws_stats1_kernel`` (per-channel mean and M2 of leaky(d), Chan's
  parallel combination inside a program, programs merged in torch), ``_dws_stats2_kernel`` (the
  same for relu(p), d and the pointwise recomputed), then ``_dws_fwd_kernel`` with the batch-stat
  affines. Both BNs' statistics cover all F frequencies, including the F mod P that the pool
  drops. When autograd will need it, the forward also stores per pooled output the argmax position
  (int8) and relu(p) there (fp32): 1/P of full resolution. Running statistics are updated as
  torch does (momentum, unbiased variance; num_batches_tracked by the caller,
  rtsed.backends.batchnorm.bn_arguments).
- backward (torch.autograd.Function): BN2's weight/bias grads come from the pooled tensors in
  torch; ``_dws_bwd_dp_kernel`` recomputes p and writes dp = dL/dp (pool backward through the
  stored argmax, BN2 backward with batch stats, ReLU backward; fp32, full resolution, because BN2's
  batch-mean terms make it dense); ``_dws_bwd_dwp_kernel`` is a split-K GEMM dp^T u over rows for
  the pointwise weight (u recomputed, partials summed in torch); ``_dws_bwd_du_kernel`` writes
  du = dp Wp (fp32, full resolution) and BN1's weight/bias grads; ``_dws_bwd_dd_kernel`` turns du
  into dd = dL/dd in place (BN1 backward with batch stats, leaky backward) with the depthwise
  weight and bias grads; ``_dws_bwd_dx_kernel`` gathers dx from dd. So the backward keeps two
  full-resolution fp32 gradient buffers (dp, and du/dd in one), 2 x 671 MB for block 1 at batch
  16 x 1024, and no forward intermediate (recomputing du in the dd kernel instead of storing it
  would trade one full-resolution write for a second C x C GEMM over dp).

Dropout2d stays outside the op: rtsed.ops.block.dws_block applies it to the pooled output (the
same RNG draws as the reference path), and hands this launcher the layer's tensors
(rtsed.models.layers.DWSBlock.dws_arguments, which checks the block's structure and does BN's
bookkeeping).

Limits: x fp32 or fp16 (parameters of any float dtype are read in fp32; the tl.dot operands are in
x's dtype, so fp16 runs the dots in fp16 with fp32 accumulation); K odd; pool P in [1, min(F, 127)]
(int8 argmax); C a multiple of C_in; CUDA tensors, or CPU tensors when this module was imported
under TRITON_INTERPRET=1. In fp32 the dots run in IEEE fp32 unless torch.backends.cudnn.allow_tf32
is set (the flag that governs the cuDNN convolutions this op replaces; on by default, off under the
parity rule). A NaN does not propagate through the max-pool as it does in torch. Tile sizes are
fixed per kernel (``_GPU_TILES``, no autotune: the interpreter crashes with several configs),
checked for register spills by an offline sm_90a compile, not timed on a GPU.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rtsed.backends.batchnorm import update_running_stats

NEGATIVE_SLOPE = 0.01
# The decorators below read TRITON_INTERPRET when this module is imported; remember what they saw,
# since the environment may change afterwards (the tests restore it).
try:
    _INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # a triton without knobs
    _INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# ----------------------------------------------------------------------------------------------
# Shared tile helpers (inlined into the kernels)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _depthwise_tile(x_ptr, wd_ptr, bd_ptr, xrow, rf, rmask, c, cmask, xch, F,
                    K: tl.constexpr, ONE_IN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """d: (BLOCK_R, BLOCK_C) fp32, the depthwise conv plus bias. Row i sits at x offset xrow[i]
    (batch and first input frame, int64) and frequency rf[i]; channel j is c[j], whose input
    channel starts at offset xch[j] (unused when ONE_IN: every channel reads input channel 0)."""
    bias = tl.load(bd_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    d = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32) + bias[None, :]
    for kt in range(K):  # a runtime loop: K loads in flight, not K * K (registers)
        for kf in tl.static_range(K):
            ff = rf + (kf - K // 2)
            fm = rmask & (ff >= 0) & (ff < F)  # zero padding over frequency
            w = tl.load(wd_ptr + c * (K * K) + (kt * K + kf), mask=cmask, other=0.0)
            if ONE_IN:
                xv = tl.load(x_ptr + xrow + kt * F + ff, mask=fm, other=0.0).to(tl.float32)
                d += xv[:, None] * w[None, :]
            else:
                xv = tl.load(x_ptr + (xrow + kt * F + ff)[:, None] + xch[None, :],
                             mask=fm[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                d += xv * w[None, :]
    return d


@triton.jit
def _pointwise_tile(x_ptr, wd_ptr, bd_ptr, s1_ptr, h1_ptr, wp_ptr, bp_ptr, xrow, rf, rmask, o, omask,
                    C, M, sxc, F, slope,
                    K: tl.constexpr, ONE_IN: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr):
    """p: (BLOCK_R, BLOCK_O) fp32 = pointwise(BN1(leaky(depthwise(x)))) + bias for output channels o,
    the depthwise recomputed block by block over the C reduction channels (never stored)."""
    acc = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        xch = (c // M).to(tl.int64) * sxc
        d = _depthwise_tile(x_ptr, wd_ptr, bd_ptr, xrow, rf, rmask, c, cmask, xch, F,
                            K, ONE_IN, BLOCK_R, BLOCK_C)
        s1 = tl.load(s1_ptr + c, mask=cmask, other=0.0)
        h1 = tl.load(h1_ptr + c, mask=cmask, other=0.0)
        u = tl.where(d > 0, d, d * slope) * s1[None, :] + h1[None, :]
        u = tl.where(cmask[None, :], u, 0.0)
        wpt = tl.load(wp_ptr + o[None, :] * C + c[:, None], mask=cmask[:, None] & omask[None, :], other=0.0)
        acc = tl.dot(u.to(wpt.dtype), wpt, acc, input_precision=PREC)
    bp = tl.load(bp_ptr + o, mask=omask, other=0.0)
    return acc + bp[None, :]


@triton.jit
def _full_rows(rb, NR, TF, F, sxb, BLOCK_R: tl.constexpr):
    """Rows rb * BLOCK_R ... of the B x T x F output positions: (n, mask, b, t*F + f, f, x offset)."""
    n = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = n < NR
    b = n // TF
    rw = n - b * TF  # t * F + f: offset inside one (b, channel) plane of a (B, C, T, F) tensor
    t = rw // F
    f = rw - t * F
    xrow = b.to(tl.int64) * sxb + t * F  # x frame t is the first of the K taps of output frame t
    return rmask, b.to(tl.int64), rw, t, f, xrow


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, v, rmask):
    """Merge the column statistics of tile v (rows masked by rmask) into (n_a, mean_a, m2_a)."""
    n_b = tl.sum(rmask.to(tl.float32), axis=0)
    v = tl.where(rmask[:, None], v, 0.0)
    mean_b = tl.sum(v, axis=0) / tl.maximum(n_b, 1.0)
    dev = tl.where(rmask[:, None], v - mean_b[None, :], 0.0)
    m2_b = tl.sum(dev * dev, axis=0)
    n = n_a + n_b
    w_b = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b


# ----------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dws_stats1_kernel(x_ptr, wd_ptr, bd_ptr, mean_ptr, m2_ptr,
                       NR, TF, C, M, F, sxb, sxc, slope, ROW_ITERS,
                       K: tl.constexpr, ONE_IN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per program: mean and M2 (sum of squared deviations) of leaky(d) over its ROW_ITERS row
    blocks, for one block of channels. Grid (row programs, channel blocks)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    xch = (c // M).to(tl.int64) * sxc
    n_a = 0.0
    mean_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for it in range(ROW_ITERS):
        rmask, b, rw, t, f, xrow = _full_rows(pid_r * ROW_ITERS + it, NR, TF, F, sxb, BLOCK_R)
        d = _depthwise_tile(x_ptr, wd_ptr, bd_ptr, xrow, f, rmask, c, cmask, xch, F, K, ONE_IN, BLOCK_R, BLOCK_C)
        a = tl.where(d > 0, d, d * slope)
        n_a, mean_a, m2_a = _chan_merge(n_a, mean_a, m2_a, a, rmask)
    tl.store(mean_ptr + pid_r * C + c, mean_a, mask=cmask)
    tl.store(m2_ptr + pid_r * C + c, m2_a, mask=cmask)


@triton.jit
def _dws_stats2_kernel(x_ptr, wd_ptr, bd_ptr, s1_ptr, h1_ptr, wp_ptr, bp_ptr, mean_ptr, m2_ptr,
                       NR, TF, C, M, F, sxb, sxc, slope, ROW_ITERS,
                       K: tl.constexpr, ONE_IN: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr):
    """Per program: mean and M2 of relu(p) over its row blocks for one block of output channels,
    recomputing the depthwise conv and the pointwise. Grid (row programs, output-channel blocks)."""
    pid_r = tl.program_id(0)
    pid_o = tl.program_id(1)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = o < C
    n_a = 0.0
    mean_a = tl.zeros((BLOCK_O,), dtype=tl.float32)
    m2_a = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for it in range(ROW_ITERS):
        rmask, b, rw, t, f, xrow = _full_rows(pid_r * ROW_ITERS + it, NR, TF, F, sxb, BLOCK_R)
        p = _pointwise_tile(x_ptr, wd_ptr, bd_ptr, s1_ptr, h1_ptr, wp_ptr, bp_ptr, xrow, f, rmask, o, omask,
                            C, M, sxc, F, slope, K, ONE_IN, PREC, BLOCK_R, BLOCK_C, BLOCK_O)
        n_a, mean_a, m2_a = _chan_merge(n_a, mean_a, m2_a, tl.maximum(p, 0.0), rmask)
    tl.store(mean_ptr + pid_r * C + o, mean_a, mask=omask)
    tl.store(m2_ptr + pid_r * C + o, m2_a, mask=omask)


@triton.jit
def _dws_fwd_kernel(x_ptr, wd_ptr, bd_ptr, s1_ptr, h1_ptr, wp_ptr, bp_ptr, s2_ptr, h2_ptr,
                    out_ptr, idx_ptr, rmax_ptr,
                    NPR, TFP, FP, C, M, F, sxb, sxc, slope,
                    K: tl.constexpr, P: tl.constexpr, ONE_IN: tl.constexpr, STORE_ARGMAX: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr):
    """The whole block for BLOCK_R pooled rows (b, t, f // P) x BLOCK_O output channels: for each of
    the P positions of the pool window the depthwise + BN1 + pointwise + ReLU + BN2 tile is
    computed in registers and max-reduced; only the pooled output (and, for the backward, the
    argmax position and relu(p) there) is written. Grid (pooled-row blocks, output-channel blocks)."""
    pid_r = tl.program_id(0)
    pid_o = tl.program_id(1)
    n = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = n < NPR
    b = n // TFP
    rw = n - b * TFP  # t * FP + fp
    t = rw // FP
    fp = rw - t * FP
    xrow = b.to(tl.int64) * sxb + t * F
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = o < C
    s2 = tl.load(s2_ptr + o, mask=omask, other=0.0)
    h2 = tl.load(h2_ptr + o, mask=omask, other=0.0)
    best = tl.full((BLOCK_R, BLOCK_O), float("-inf"), dtype=tl.float32)
    best_j = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.int32)
    best_r = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
    for j in range(P):
        p = _pointwise_tile(x_ptr, wd_ptr, bd_ptr, s1_ptr, h1_ptr, wp_ptr, bp_ptr, xrow, fp * P + j, rmask,
                            o, omask, C, M, sxc, F, slope, K, ONE_IN, PREC, BLOCK_R, BLOCK_C, BLOCK_O)
        r = tl.maximum(p, 0.0)
        z = r * s2[None, :] + h2[None, :]
        better = z > best  # strict: the first maximum wins, as in torch's max_pool2d
        best = tl.where(better, z, best)
        if STORE_ARGMAX:
            best_j = tl.where(better, j, best_j)
            best_r = tl.where(better, r, best_r)
    off = b.to(tl.int64)[:, None] * C * TFP + o[None, :] * TFP + rw[:, None]
    mask = rmask[:, None] & omask[None, :]
    tl.store(out_ptr + off, best.to(out_ptr.dtype.element_ty), mask=mask)
    if STORE_ARGMAX:
        tl.store(idx_ptr + off, best_j.to(tl.int8), mask=mask)
        tl.store(rmax_ptr + off, best_r, mask=mask)


# ----------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dws_bwd_dp_kernel(x_ptr, wd_ptr, bd_ptr, s1_ptr, h1_ptr, wp_ptr, bp_ptr,
                       g_ptr, idx_ptr, s2_ptr, mu2_ptr, rstd2_ptr, mdz_ptr, mdzr_ptr, dp_ptr, sdp_ptr,
                       NR, TF, TFP, FP, C, M, F, sxb, sxc, slope, ROW_ITERS,
                       K: tl.constexpr, P: tl.constexpr, ONE_IN: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr):
    """dp = dL/dp at every (b, t, f) row: pool backward (stored argmax), BN2 backward
    (dr = s2 (dz - mean(dz) - r_hat mean(dz r_hat)); the means are zero with running stats),
    ReLU backward. Writes dp (B, C, T, F) fp32 and per-program sums of dp (the pointwise bias grad).
    Grid (row programs, output-channel blocks)."""
    pid_r = tl.program_id(0)
    pid_o = tl.program_id(1)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = o < C
    s2 = tl.load(s2_ptr + o, mask=omask, other=0.0)
    mu2 = tl.load(mu2_ptr + o, mask=omask, other=0.0)
    rstd2 = tl.load(rstd2_ptr + o, mask=omask, other=0.0)
    mdz = tl.load(mdz_ptr + o, mask=omask, other=0.0)
    mdzr = tl.load(mdzr_ptr + o, mask=omask, other=0.0)
    sdp = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for it in range(ROW_ITERS):
        rmask, b, rw, t, f, xrow = _full_rows(pid_r * ROW_ITERS + it, NR, TF, F, sxb, BLOCK_R)
        p = _pointwise_tile(x_ptr, wd_ptr, bd_ptr, s1_ptr, h1_ptr, wp_ptr, bp_ptr, xrow, f, rmask, o, omask,
                            C, M, sxc, F, slope, K, ONE_IN, PREC, BLOCK_R, BLOCK_C, BLOCK_O)
        fp = f // P
        j = f - fp * P
        mask = rmask[:, None] & omask[None, :]
        pmask = mask & (fp < FP)[:, None]  # the last F mod P frequencies are not pooled
        goff = b[:, None] * C * TFP + o[None, :] * TFP + (t * FP + fp)[:, None]
        g = tl.load(g_ptr + goff, mask=pmask, other=0.0)
        jmax = tl.load(idx_ptr + goff, mask=pmask, other=-1).to(tl.int32)
        dz = tl.where(jmax == j[:, None], g, 0.0)
        r_hat = (tl.maximum(p, 0.0) - mu2[None, :]) * rstd2[None, :]
        dr = s2[None, :] * (dz - mdz[None, :] - r_hat * mdzr[None, :])
        dp = tl.where((p > 0) & mask, dr, 0.0)
        tl.store(dp_ptr + b[:, None] * C * TF + o[None, :] * TF + rw[:, None], dp, mask=mask)
        sdp += tl.sum(dp, axis=0)
    tl.store(sdp_ptr + pid_r * C + o, sdp, mask=omask)


@triton.jit
def _dws_bwd_dwp_kernel(x_ptr, wd_ptr, bd_ptr, s1_ptr, h1_ptr, dp_ptr, dwp_ptr,
                        NR, TF, C, M, F, sxb, sxc, slope, SPLIT, ROW_ITERS,
                        K: tl.constexpr, ONE_IN: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr):
    """Pointwise weight gradient dWp[o, c] = sum over rows of dp[row, o] u[row, c] as a split-K
    GEMM: program (o block, c block, split s) sums row blocks s, s + SPLIT, ... (u recomputed from
    x) into its own partial (SPLIT, C, C), summed in torch. Grid (o blocks, c blocks, SPLIT)."""
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = o < C
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    xch = (c // M).to(tl.int64) * sxc
    s1 = tl.load(s1_ptr + c, mask=cmask, other=0.0)
    h1 = tl.load(h1_ptr + c, mask=cmask, other=0.0)
    acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    for it in range(ROW_ITERS):
        rmask, b, rw, t, f, xrow = _full_rows(pid_s + it * SPLIT, NR, TF, F, sxb, BLOCK_R)
        d = _depthwise_tile(x_ptr, wd_ptr, bd_ptr, xrow, f, rmask, c, cmask, xch, F, K, ONE_IN, BLOCK_R, BLOCK_C)
        u = tl.where(d > 0, d, d * slope) * s1[None, :] + h1[None, :]
        u = tl.where(rmask[:, None] & cmask[None, :], u, 0.0)
        dpt = tl.load(dp_ptr + o[:, None] * TF + (b * C * TF + rw)[None, :],
                      mask=omask[:, None] & rmask[None, :], other=0.0)  # (BLOCK_O, BLOCK_R)
        dot_t = x_ptr.dtype.element_ty  # x's dtype: fp16 operands (fp32 accumulation) in fp16
        acc = tl.dot(dpt.to(dot_t), u.to(dot_t), acc, input_precision=PREC)
    tl.store(dwp_ptr + pid_s * C * C + o[:, None] * C + c[None, :], acc, mask=omask[:, None] & cmask[None, :])


@triton.jit
def _dws_bwd_du_kernel(x_ptr, wd_ptr, bd_ptr, mu1_ptr, rstd1_ptr, wp_ptr, dp_ptr, du_ptr, sdu_ptr, sdua_ptr,
                       NR, TF, C, M, F, sxb, sxc, slope, ROW_ITERS,
                       K: tl.constexpr, ONE_IN: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr):
    """du = dp @ Wp for a block of depthwise channels (du: (B, C, T, F) fp32), with per-program
    sums of du and du * a_hat (BN1's bias and weight grads), a = leaky(d) recomputed.
    Grid (row programs, channel blocks)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    xch = (c // M).to(tl.int64) * sxc
    mu1 = tl.load(mu1_ptr + c, mask=cmask, other=0.0)
    rstd1 = tl.load(rstd1_ptr + c, mask=cmask, other=0.0)
    sdu = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sdua = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for it in range(ROW_ITERS):
        rmask, b, rw, t, f, xrow = _full_rows(pid_r * ROW_ITERS + it, NR, TF, F, sxb, BLOCK_R)
        du = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for o0 in range(0, C, BLOCK_O):
            o = o0 + tl.arange(0, BLOCK_O)
            omask = o < C
            dpt = tl.load(dp_ptr + (b * C * TF + rw)[:, None] + o[None, :] * TF,
                          mask=rmask[:, None] & omask[None, :], other=0.0)
            wpt = tl.load(wp_ptr + o[:, None] * C + c[None, :], mask=omask[:, None] & cmask[None, :], other=0.0)
            du = tl.dot(dpt.to(wpt.dtype), wpt, du, input_precision=PREC)
        mask = rmask[:, None] & cmask[None, :]
        du = tl.where(mask, du, 0.0)
        tl.store(du_ptr + (b * C * TF + rw)[:, None] + c[None, :] * TF, du, mask=mask)
        d = _depthwise_tile(x_ptr, wd_ptr, bd_ptr, xrow, f, rmask, c, cmask, xch, F, K, ONE_IN, BLOCK_R, BLOCK_C)
        a_hat = (tl.where(d > 0, d, d * slope) - mu1[None, :]) * rstd1[None, :]
        sdu += tl.sum(du, axis=0)
        sdua += tl.sum(du * a_hat, axis=0)
    tl.store(sdu_ptr + pid_r * C + c, sdu, mask=cmask)
    tl.store(sdua_ptr + pid_r * C + c, sdua, mask=cmask)


@triton.jit
def _dws_bwd_dd_kernel(x_ptr, wd_ptr, bd_ptr, mu1_ptr, rstd1_ptr, s1_ptr, mdu_ptr, mdua_ptr, dd_ptr,
                       sdd_ptr, dwd_ptr,
                       NR, TF, C, M, F, sxb, sxc, slope, ROW_ITERS,
                       K: tl.constexpr, ONE_IN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                       KK_PAD: tl.constexpr):
    """In place on the du buffer: dd = leaky'(d) * s1 (du - mean(du) - a_hat mean(du a_hat)) (the
    means are zero with running stats). Per program: sums of dd (depthwise bias grad) and, per tap,
    of dd * x (depthwise weight grad, (C, K * K) padded to KK_PAD columns).
    Grid (row programs, channel blocks)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    xch = (c // M).to(tl.int64) * sxc
    mu1 = tl.load(mu1_ptr + c, mask=cmask, other=0.0)
    rstd1 = tl.load(rstd1_ptr + c, mask=cmask, other=0.0)
    s1 = tl.load(s1_ptr + c, mask=cmask, other=0.0)
    mdu = tl.load(mdu_ptr + c, mask=cmask, other=0.0)
    mdua = tl.load(mdua_ptr + c, mask=cmask, other=0.0)
    taps = tl.arange(0, KK_PAD)
    sdd = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dwd = tl.zeros((BLOCK_C, KK_PAD), dtype=tl.float32)
    for it in range(ROW_ITERS):
        rmask, b, rw, t, f, xrow = _full_rows(pid_r * ROW_ITERS + it, NR, TF, F, sxb, BLOCK_R)
        mask = rmask[:, None] & cmask[None, :]
        d = _depthwise_tile(x_ptr, wd_ptr, bd_ptr, xrow, f, rmask, c, cmask, xch, F, K, ONE_IN, BLOCK_R, BLOCK_C)
        a_hat = (tl.where(d > 0, d, d * slope) - mu1[None, :]) * rstd1[None, :]
        doff = (b * C * TF + rw)[:, None] + c[None, :] * TF
        du = tl.load(dd_ptr + doff, mask=mask, other=0.0)
        da = s1[None, :] * (du - mdu[None, :] - a_hat * mdua[None, :])
        dd = tl.where(d > 0, da, da * slope)
        dd = tl.where(mask, dd, 0.0)
        tl.store(dd_ptr + doff, dd, mask=mask)
        sdd += tl.sum(dd, axis=0)
        for kt in range(K):  # a runtime loop: K loads in flight, not K * K (registers)
            for kf in tl.static_range(K):
                ff = f + (kf - K // 2)
                fm = rmask & (ff >= 0) & (ff < F)
                if ONE_IN:
                    xv = tl.load(x_ptr + xrow + kt * F + ff, mask=fm, other=0.0).to(tl.float32)
                    contrib = tl.sum(dd * xv[:, None], axis=0)
                else:
                    xv = tl.load(x_ptr + (xrow + kt * F + ff)[:, None] + xch[None, :],
                                 mask=fm[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                    contrib = tl.sum(dd * xv, axis=0)
                dwd += contrib[:, None] * (taps == kt * K + kf).to(tl.float32)[None, :]
    tl.store(sdd_ptr + pid_r * C + c, sdd, mask=cmask)
    tl.store(dwd_ptr + pid_r * C * (K * K) + c[:, None] * (K * K) + taps[None, :], dwd,
             mask=cmask[:, None] & (taps < K * K)[None, :])


@triton.jit
def _dx_taps(acc, dd_ptr, wd_ptr, dd_b, tq, fq, rmask, c, cmask, T, F, TF, K: tl.constexpr):
    """acc (BLOCK_R, BLOCK_C) += dd[b, c, t' - kt, f' - kf + K // 2] w[c, kt, kf] over the K x K taps."""
    for kt in range(K):  # a runtime loop: K loads in flight, not K * K (registers)
        for kf in tl.static_range(K):
            t = tq - kt
            f = fq + (K // 2 - kf)
            ok = rmask & (t >= 0) & (t < T) & (f >= 0) & (f < F)
            ddv = tl.load(dd_ptr + (dd_b + t * F + f)[:, None] + c[None, :] * TF,
                          mask=ok[:, None] & cmask[None, :], other=0.0)
            w = tl.load(wd_ptr + c * (K * K) + (kt * K + kf), mask=cmask, other=0.0)
            acc += ddv * w[None, :]
    return acc


@triton.jit
def _dws_bwd_dx_kernel(dd_ptr, wd_ptr, dx_ptr, NX, TPF, TF, T, C, C_in, M, F,
                       K: tl.constexpr, GROUPED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx[b, ci, t', f'] = sum over channels c of group ci and taps (kt, kf) of
    dd[b, c, t' - kt, f' - kf + K // 2] w[c, kt, kf], gathered (no atomics). Rows are the
    B x (T + K - 1) x F input positions. GROUPED (C_in < C, e.g. block 1's single input channel):
    grid (row blocks, C_in), the group's M channels reduced in blocks; else (true depthwise, M = 1):
    grid (row blocks, channel blocks)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = n < NX
    b = n // TPF
    rw = n - b * TPF  # t' * F + f' in one input plane
    tq = rw // F
    fq = rw - tq * F
    b64 = b.to(tl.int64)
    dd_b = b64 * C * TF
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    if GROUPED:
        for m0 in range(0, M, BLOCK_C):
            m = m0 + tl.arange(0, BLOCK_C)
            acc = _dx_taps(acc, dd_ptr, wd_ptr, dd_b, tq, fq, rmask, pid_c * M + m, m < M, T, F, TF, K)
        dx = tl.sum(acc, axis=1)
        tl.store(dx_ptr + b64 * C_in * TPF + pid_c * TPF + rw, dx.to(dx_ptr.dtype.element_ty), mask=rmask)
    else:
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        acc = _dx_taps(acc, dd_ptr, wd_ptr, dd_b, tq, fq, rmask, c, cmask, T, F, TF, K)
        tl.store(dx_ptr + (b64 * C_in * TPF + rw)[:, None] + c[None, :] * TPF, acc.to(dx_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# Tile sizes per kernel on a GPU (BLOCK_* and num_warps), chosen so that offline compiles for sm_90
# and sm_80 (python -m benchmarks.kernel_resources: triton.compile and ptxas, no GPU needed) report
# no spill stores with TF32 and fp16 dots (fp32 IEEE: the allowances listed there, table in
# benchmarks/README.md). A smaller tile does not always spill less: ptxas may then aim at 128
# registers and spill a few bytes (dd did at 32 rows on sm_90, fwd at 16), so each entry is a size
# that compiled clean on both targets, not a bound to shrink below. Not timed on a GPU: tune there first.
# BLOCK_O is capped at the channel count rounded up to a power of two (at least 16 for tl.dot).
_GPU_TILES = {
    "stats1": dict(BLOCK_R=64, BLOCK_C=32, num_warps=8),
    "stats2": dict(BLOCK_R=32, BLOCK_C=32, BLOCK_O=128, num_warps=8),
    "fwd": dict(BLOCK_R=32, BLOCK_C=32, BLOCK_O=64, num_warps=8),
    "dp": dict(BLOCK_R=32, BLOCK_C=32, BLOCK_O=128, num_warps=8),
    "dwp": dict(BLOCK_R=32, BLOCK_C=32, BLOCK_O=64, num_warps=8),
    "du": dict(BLOCK_R=16, BLOCK_C=32, BLOCK_O=32, num_warps=8),
    "dd": dict(BLOCK_R=16, BLOCK_C=32, num_warps=8),
    "dx": dict(BLOCK_R=64, BLOCK_C=32, num_warps=8),
}
# Interpreter: every program instance costs ~0.35 ms, so few programs; 16-channel tiles so that
# tests with C > 16 cover several channel blocks, and a small row-program target so that the row
# loops of the reducing kernels run several times.
_INTERPRETER_TILES = {name: dict(BLOCK_R=32, BLOCK_C=16, BLOCK_O=16, num_warps=4) for name in _GPU_TILES}
_INTERPRETER_ROW_PROGRAMS = 3


def _tiles(x: torch.Tensor, name: str, channels: int) -> dict:
    """Keyword arguments (BLOCK_* and num_warps) for launching kernel ``name``."""
    return _table_tiles(_INTERPRETER_TILES if not x.is_cuda else _GPU_TILES, name, channels)


def _table_tiles(table: dict, name: str, channels: int) -> dict:
    """Kernel ``name``'s entry of a tile table, channel blocks capped for ``channels`` channels
    (benchmarks/kernel_resources.py compiles the GPU table's entries without a GPU)."""
    tiles = dict(table[name])
    cap = max(16, _next_pow2(channels))
    for key in ("BLOCK_C", "BLOCK_O"):
        if key in tiles:
            tiles[key] = min(tiles[key], cap)
    if name == "stats1" or name == "dd" or name == "dx":
        tiles.pop("BLOCK_O", None)
    return tiles


def _row_programs(x: torch.Tensor) -> int:
    """Target number of programs for the kernels that reduce over rows (a few waves of SMs)."""
    if not x.is_cuda:
        return _INTERPRETER_ROW_PROGRAMS
    return _gpu_row_programs(torch.cuda.get_device_properties(x.device).multi_processor_count)


def _gpu_row_programs(sm_count: int) -> int:
    return 4 * sm_count


def _dot_precision(x: torch.Tensor) -> str:
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _row_split(n_rows: int, block_r: int, target_programs: int) -> tuple[int, int]:
    """(programs, row blocks per program) covering n_rows rows in blocks of block_r."""
    blocks = triton.cdiv(n_rows, block_r)
    iters = triton.cdiv(blocks, max(1, min(target_programs, blocks)))  # target_programs may be 0
    return triton.cdiv(blocks, iters), iters


def _merge_stats(mean: torch.Tensor, m2: torch.Tensor, n_rows: int,
                 block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-program (mean, M2) rows (Chan et al.) into the batch mean and biased variance."""
    programs = mean.shape[0]
    starts = torch.arange(programs, device=mean.device, dtype=torch.float64) * block_rows
    count = (n_rows - starts).clamp(0, block_rows)[:, None]
    mean, m2 = mean.double(), m2.double()
    total = mean.new_tensor(float(n_rows))
    mean_all = (count * mean).sum(0) / total
    m2_all = (m2 + count * (mean - mean_all) ** 2).sum(0)
    return mean_all.float(), (m2_all / total).float()


def _pair(v) -> tuple:
    return (v[0], v[1]) if isinstance(v, (tuple, list)) else (v, v)


# ----------------------------------------------------------------------------------------------
# Autograd function
# ----------------------------------------------------------------------------------------------


def _vec(t: torch.Tensor | None, n: int, fill: float, like: torch.Tensor) -> torch.Tensor:
    if t is None:
        return torch.full((n,), fill, device=like.device, dtype=torch.float32)
    return t.detach().float().contiguous()


class _DWSBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_mean, bn1_var,
                pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_mean, bn2_var,
                pool, training, momentum, eps, negative_slope, need_grad):
        x = x.contiguous()
        B, C_in, Tp, F = x.shape
        C, K = dw_weight.shape[0], dw_weight.shape[-1]
        T, FP, M = Tp - K + 1, F // pool, C // C_in
        NR = B * T * F
        prec = _dot_precision(x)
        one_in = C_in == 1
        mom1, mom2 = _pair(momentum)
        eps1, eps2 = _pair(eps)
        batch1 = training or bn1_mean is None
        batch2 = training or bn2_mean is None
        dev = x.device
        wd = dw_weight.detach().reshape(C, K * K).float().contiguous()
        bd = _vec(dw_bias, C, 0.0, x)
        g1, b1 = _vec(bn1_weight, C, 1.0, x), _vec(bn1_bias, C, 0.0, x)
        wp = pw_weight.detach().reshape(C, C).to(x.dtype).contiguous()
        bp = _vec(pw_bias, C, 0.0, x)
        g2, b2 = _vec(bn2_weight, C, 1.0, x), _vec(bn2_bias, C, 0.0, x)
        sxb, sxc = C_in * Tp * F, Tp * F
        common = (NR, T * F, C, M, F, sxb, sxc, negative_slope)
        row_programs = _row_programs(x)

        # BN1 statistics: a pass over leaky(depthwise(x)).
        if batch1:
            tiles = _tiles(x, "stats1", C)
            n_cb = triton.cdiv(C, tiles["BLOCK_C"])
            progs, iters = _row_split(NR, tiles["BLOCK_R"], row_programs // n_cb)
            mean_p = torch.empty(progs, C, device=dev, dtype=torch.float32)
            m2_p = torch.empty_like(mean_p)
            _dws_stats1_kernel[(progs, n_cb)](x, wd, bd, mean_p, m2_p, *common, iters,
                                              K=K, ONE_IN=one_in, **tiles)
            mu1, var1 = _merge_stats(mean_p, m2_p, NR, iters * tiles["BLOCK_R"])
            update_running_stats(bn1_mean, bn1_var, mu1, var1, NR, mom1)
        else:
            mu1, var1 = bn1_mean.detach().float(), bn1_var.detach().float()
        rstd1 = torch.rsqrt(var1 + eps1)
        s1 = (g1 * rstd1).contiguous()
        h1 = (b1 - mu1 * s1).contiguous()

        # BN2 statistics: a pass over relu(pointwise(...)), the depthwise recomputed.
        if batch2:
            tiles = _tiles(x, "stats2", C)
            n_ob = triton.cdiv(C, tiles["BLOCK_O"])
            progs, iters = _row_split(NR, tiles["BLOCK_R"], row_programs // n_ob)
            mean_p = torch.empty(progs, C, device=dev, dtype=torch.float32)
            m2_p = torch.empty_like(mean_p)
            _dws_stats2_kernel[(progs, n_ob)](x, wd, bd, s1, h1, wp, bp, mean_p, m2_p, *common, iters,
                                              K=K, ONE_IN=one_in, PREC=prec, **tiles)
            mu2, var2 = _merge_stats(mean_p, m2_p, NR, iters * tiles["BLOCK_R"])
            update_running_stats(bn2_mean, bn2_var, mu2, var2, NR, mom2)
        else:
            mu2, var2 = bn2_mean.detach().float(), bn2_var.detach().float()
        rstd2 = torch.rsqrt(var2 + eps2)
        s2 = (g2 * rstd2).contiguous()
        h2 = (b2 - mu2 * s2).contiguous()

        # The block, pooled in registers (need_grad: autograd will call backward, so keep the
        # argmax; ctx.needs_input_grad cannot tell, it is set under no_grad too).
        out = torch.empty(B, C, T, FP, device=dev, dtype=x.dtype)
        if need_grad:
            idx = torch.empty(B, C, T, FP, device=dev, dtype=torch.int8)
            rmax = torch.empty(B, C, T, FP, device=dev, dtype=torch.float32)
        else:
            idx = rmax = out  # not written (STORE_ARGMAX=False)
        NPR = B * T * FP
        tiles = _tiles(x, "fwd", C)
        grid = (triton.cdiv(NPR, tiles["BLOCK_R"]), triton.cdiv(C, tiles["BLOCK_O"]))
        _dws_fwd_kernel[grid](x, wd, bd, s1, h1, wp, bp, s2, h2, out, idx, rmax, NPR, T * FP, FP, C, M, F, sxb, sxc,
                              negative_slope, K=K, P=pool, ONE_IN=one_in, STORE_ARGMAX=need_grad, PREC=prec,
                              **tiles)

        if need_grad:
            ctx.save_for_backward(x, wd, bd, wp, bp, s1, h1, mu1, rstd1, s2, mu2, rstd2, idx, rmax)
            ctx.meta = (pool, batch1, batch2, negative_slope, one_in)
            ctx.param_dtypes = [None if t is None else t.dtype for t in
                                (dw_weight, dw_bias, bn1_weight, bn1_bias, pw_weight, pw_bias, bn2_weight, bn2_bias)]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, wd, bd, wp, bp, s1, h1, mu1, rstd1, s2, mu2, rstd2, idx, rmax = ctx.saved_tensors
        pool, batch1, batch2, slope, one_in = ctx.meta
        needs = ctx.needs_input_grad
        B, C_in, Tp, F = x.shape
        C, KK = wd.shape
        K = math.isqrt(KK)
        T, FP, M = Tp - K + 1, F // pool, C // C_in
        NR, TF = B * T * F, T * F
        prec = _dot_precision(x)
        dev = x.device
        sxb, sxc = C_in * Tp * F, Tp * F
        common = (NR, TF, C, M, F, sxb, sxc, slope)
        row_programs = _row_programs(x)
        g = grad_out.float().contiguous()

        # BN2's affine grads from the pooled tensors: each pooled gradient lands on one position.
        r_hat_max = (rmax - mu2.view(1, C, 1, 1)) * rstd2.view(1, C, 1, 1)
        d_bn2_bias = g.sum((0, 2, 3))
        d_bn2_weight = (g * r_hat_max).sum((0, 2, 3))
        zeros = torch.zeros(C, device=dev, dtype=torch.float32)
        mdz, mdzr = (d_bn2_bias / NR, d_bn2_weight / NR) if batch2 else (zeros, zeros)

        # dp = dL/dp (pool, BN2, ReLU backward), p recomputed.
        tiles = _tiles(x, "dp", C)
        n_ob = triton.cdiv(C, tiles["BLOCK_O"])
        progs, iters = _row_split(NR, tiles["BLOCK_R"], row_programs // n_ob)
        dp = torch.empty(B, C, T, F, device=dev, dtype=torch.float32)
        sdp = torch.empty(progs, C, device=dev, dtype=torch.float32)
        _dws_bwd_dp_kernel[(progs, n_ob)](x, wd, bd, s1, h1, wp, bp, g, idx, s2, mu2, rstd2,
                                          mdz.contiguous(), mdzr.contiguous(), dp, sdp,
                                          NR, TF, T * FP, FP, C, M, F, sxb, sxc, slope, iters,
                                          K=K, P=pool, ONE_IN=one_in, PREC=prec, **tiles)
        d_pw_bias = sdp.sum(0)

        # Pointwise weight: split-K GEMM dp^T u over rows, u recomputed.
        d_pw_weight = None
        if needs[7]:
            tiles = _tiles(x, "dwp", C)
            n_ob, n_cb = triton.cdiv(C, tiles["BLOCK_O"]), triton.cdiv(C, tiles["BLOCK_C"])
            n_blocks = triton.cdiv(NR, tiles["BLOCK_R"])
            split = max(1, min(n_blocks, row_programs // (n_ob * n_cb)))
            dwp = torch.empty(split, C, C, device=dev, dtype=torch.float32)
            _dws_bwd_dwp_kernel[(n_ob, n_cb, split)](x, wd, bd, s1, h1, dp, dwp, *common, split,
                                                     triton.cdiv(n_blocks, split),
                                                     K=K, ONE_IN=one_in, PREC=prec, **tiles)
            d_pw_weight = dwp.sum(0)

        d_x = d_dw_weight = d_dw_bias = d_bn1_weight = d_bn1_bias = None
        if any(needs[i] for i in (0, 1, 2, 3, 4)):
            # du = dp @ Wp, and BN1's affine grads.
            tiles = _tiles(x, "du", C)
            n_cb = triton.cdiv(C, tiles["BLOCK_C"])
            progs, iters = _row_split(NR, tiles["BLOCK_R"], row_programs // n_cb)
            du = torch.empty(B, C, T, F, device=dev, dtype=torch.float32)
            sdu = torch.empty(progs, C, device=dev, dtype=torch.float32)
            sdua = torch.empty_like(sdu)
            _dws_bwd_du_kernel[(progs, n_cb)](x, wd, bd, mu1, rstd1, wp, dp, du, sdu, sdua, *common, iters,
                                              K=K, ONE_IN=one_in, PREC=prec, **tiles)
            del dp
            d_bn1_bias, d_bn1_weight = sdu.sum(0), sdua.sum(0)
            mdu, mdua = (d_bn1_bias / NR, d_bn1_weight / NR) if batch1 else (zeros, zeros)

            # dd = dL/dd in place of du (BN1 and leaky backward), depthwise weight and bias grads.
            tiles = _tiles(x, "dd", C)
            n_cb = triton.cdiv(C, tiles["BLOCK_C"])
            progs, iters = _row_split(NR, tiles["BLOCK_R"], row_programs // n_cb)
            sdd = torch.empty(progs, C, device=dev, dtype=torch.float32)
            dwd = torch.empty(progs, C, K * K, device=dev, dtype=torch.float32)
            _dws_bwd_dd_kernel[(progs, n_cb)](x, wd, bd, mu1, rstd1, s1, mdu.contiguous(), mdua.contiguous(),
                                              du, sdd, dwd, *common, iters,
                                              K=K, ONE_IN=one_in, KK_PAD=_next_pow2(K * K), **tiles)
            d_dw_bias, d_dw_weight = sdd.sum(0), dwd.sum(0).view(C, 1, K, K)

            # dx gathered from dd.
            if needs[0]:
                d_x = torch.empty_like(x)
                grouped = M > 1
                nx = B * Tp * F
                tiles = _tiles(x, "dx", C)
                grid = (triton.cdiv(nx, tiles["BLOCK_R"]), C_in if grouped else triton.cdiv(C, tiles["BLOCK_C"]))
                _dws_bwd_dx_kernel[grid](du, wd, d_x, nx, Tp * F, TF, T, C, C_in, M, F,
                                         K=K, GROUPED=grouped, **tiles)

        dt = ctx.param_dtypes
        cast = lambda grad, i: None if grad is None or dt[i] is None else grad.to(dt[i])  # noqa: E731
        return (d_x,
                cast(d_dw_weight, 0), cast(d_dw_bias, 1), cast(d_bn1_weight, 2), cast(d_bn1_bias, 3), None, None,
                cast(None if d_pw_weight is None else d_pw_weight.view(C, C, 1, 1), 4), cast(d_pw_bias, 5),
                cast(d_bn2_weight, 6), cast(d_bn2_bias, 7), None, None,
                None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Public API: launcher and reference twin
# ----------------------------------------------------------------------------------------------


def _check(x, dw_weight, pw_weight, pool) -> None:
    if x.dim() != 4:
        raise ValueError(f"dws_block expects x (B, C_in, T + K - 1, F), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"dws_block runs in float32 or float16, got {x.dtype}")
    if not x.is_cuda and not _INTERPRETED:
        raise RuntimeError(f"dws_block's Triton kernels need a CUDA tensor (got {x.device}), or "
                           "TRITON_INTERPRET=1 set before kernels.dws_block is imported")
    B, C_in, Tp, F = x.shape
    C, one, K, K2 = dw_weight.shape
    if one != 1 or K != K2 or K % 2 != 1:
        raise ValueError(f"depthwise weight must be (C, 1, K, K) with K odd, got {tuple(dw_weight.shape)}")
    if C % C_in:
        raise ValueError(f"output channels {C} are not a multiple of the input channels {C_in}")
    if tuple(pw_weight.shape) != (C, C, 1, 1):
        raise ValueError(f"pointwise weight must be ({C}, {C}, 1, 1), got {tuple(pw_weight.shape)}")
    if Tp < K:
        raise ValueError(f"x has {Tp} frames, fewer than the kernel's {K}: pad time first")
    if not 1 <= pool <= F or pool > 127:
        raise ValueError(f"pool {pool} must lie in [1, min(F={F}, 127)]")
    for t in (dw_weight, pw_weight):
        if t.device != x.device:
            raise ValueError(f"parameters on {t.device}, input on {x.device}")


def dws_block(x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var,
              pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var,
              *, pool: int, training: bool, momentum=0.1, eps=1e-5, negative_slope: float = NEGATIVE_SLOPE):
    """The fused block (Triton, differentiable). x: (B, C_in, T + K - 1, F) -> (B, C, T, F // pool).

    BatchNorm follows F.batch_norm: training=True (or no running stats) uses batch statistics and
    updates the running stats in place, if given; else the running stats. momentum and eps are one
    value for both BNs or an (inner, outer) pair. Dropout is not included."""
    _check(x, dw_weight, pw_weight, pool)
    tensors = (x, dw_weight, dw_bias, bn1_weight, bn1_bias, pw_weight, pw_bias, bn2_weight, bn2_bias)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _DWSBlockFunction.apply(x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var,
                                   pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var,
                                   int(pool), bool(training), momentum, eps, float(negative_slope), need_grad)


def dws_block_ref(x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var,
                  pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var,
                  *, pool: int, training: bool, momentum=0.1, eps=1e-5, negative_slope: float = NEGATIVE_SLOPE):
    """Stock-torch twin of ``dws_block`` (same arguments, same running-stat updates)."""
    mom1, mom2 = _pair(momentum)
    eps1, eps2 = _pair(eps)
    K = dw_weight.shape[-1]
    d = F.conv2d(x, dw_weight, dw_bias, padding=(0, K // 2), groups=x.shape[1])
    u = F.batch_norm(F.leaky_relu(d, negative_slope), bn1_running_mean, bn1_running_var, bn1_weight, bn1_bias,
                     training or bn1_running_mean is None, mom1, eps1)
    p = F.conv2d(u, pw_weight, pw_bias)
    z = F.batch_norm(F.relu(p), bn2_running_mean, bn2_running_var, bn2_weight, bn2_bias,
                     training or bn2_running_mean is None, mom2, eps2)
    return F.max_pool2d(z, (1, pool), (1, pool))

