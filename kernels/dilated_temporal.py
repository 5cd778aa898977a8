"""f_dil's dilated temporal convolution fused with its ReLU and BatchNorm, forward and backward.

Op (docs/reference.md "Dilated part"; ``dilated_temporal_ref`` is the twin in stock torch)::

    p = conv2d(x, weight, bias, stride=(1, S), dilation=(d, 1))   1 -> C_out, K x K, no padding
    y = BN(relu(p))                                              batch statistics in training

Shapes: x (B, 1, T + (K - 1) d, C), already time-padded by the layer ("same" and "causal" padding
both reduce to a valid conv in time here; no padding over C) -> y (B, C_out, T, W),
W = (C - K) // S + 1. weight (C_out, 1, K, K), bias (C_out), BN parameters and running statistics
(C_out). y is returned as a (B, C_out, T, W) view of a (B, T, C_out, W) buffer: that is the layout
the per-frame classifier flattens (channel-major, c * W + w), so the layer's permute + reshape that
follows costs no copy.

How it runs. im2col view: every output row (b, t, w) reads K time taps (spaced d) x K adjacent
channels (from w * S), a K*K patch vector, and p = patches (rows, K*K) @ weight^T (K*K, C_out) + bias:
one tl.dot per tile of BLOCK_R rows (the K*K axis padded to KK_PAD, a power of two >= 16), fp32
accumulation, every load masked. The patches are gathered from x with plain pointer arithmetic
(x is B*(T+pad)*C elements, ~K*K*C_out/S times smaller than y, so it stays in L2).

- ``_dilated_temporal_kernel`` (forward): one program per row tile, looping over output-channel
  blocks with the patch tile held; epilogue relu then a per-channel affine y = r * scale + shift
  (eval: BN folded from the running statistics; training: from the batch statistics).
- training: ``_dilated_temporal_stats_kernel`` first computes per-channel mean and M2 of relu(p)
  (each tile exactly, then Chan's parallel merge across the tiles of a program and, in float64, across
  programs: no E[x^2] - E[x]^2 cancellation), then the forward kernel RECOMPUTES p. Recompute rather
  than store: storing p costs a write and a read of the full (B, C_out, T, W) tensor (1.4 GB in fp32
  for 16 x 1024 frames at C_out = 256, W = 84), recomputing costs 2 K*K FLOPs per element on a tile
  of x that sits in L2. Running statistics are updated as torch does (momentum, unbiased variance).
- backward (``_DilatedTemporalFn``), recomputing p from x in each pass (nothing full-size is saved):
  dr = gamma rstd (g - mean(g) - xhat mean(g xhat)) in training (the mean terms vanish in eval),
  dp = dr where p > 0 (ReLU mask from the recomputed pre-activation);
  ``_dilated_temporal_bwd_stats_kernel``: per-channel sum(g), sum(g xhat) (= dbeta, dgamma and
  the two BN mean terms); ``_dilated_temporal_bwd_dw_kernel``: dweight = patches^T @ dp and
  dbias = sum(dp), split over rows into per-program partials summed in torch (no atomics);
  ``_dilated_temporal_bwd_dpatch_kernel``: dpatches = dp @ weight (rows, K*K), fp32, stored
  transposed (K*K, rows); ``_dilated_temporal_bwd_dx_kernel``: dx GATHERED from dpatches (each
  input position sums its at most K * ceil(K / S) taps; no atomics, deterministic).
  Full-size traffic: g is read three times (twice in eval without BN-parameter grads); the one
  intermediate stored is dpatches, K*K / C_out of the size of y in fp32.

Limits: x float32 or float16 (bf16 is not supported: the interpreter computes it wrongly, so it
cannot be tested here); parameters may be any float dtype (read in fp32; the conv weight is cast
to x's dtype for tl.dot, so an fp16 x with fp32 weights rounds the weights); K <= C; CUDA tensors,
or CPU tensors when this module was imported under TRITON_INTERPRET=1. In fp32 the dots run in
IEEE fp32 unless torch.backends.cudnn.allow_tf32 is set (the switch that governs the cuDNN conv
this replaces); the parity rule turns it off. In fp16 the dots take fp16 operands (the weight
gradient's dot takes dp rounded to fp16, as cuDNN's fp16 backward does) with fp32 accumulation;
BN statistics and all epilogues are fp32. Block sizes on CUDA are untuned guesses for an H100
(no autotune: the interpreter crashes with several configs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rtsed.backends.batchnorm import update_running_stats

# The @triton.jit decorators read TRITON_INTERPRET when this module is imported; remember what they
# saw, since the environment may change afterwards (the tests restore it).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# Tile helpers (inlined into the kernels; kernels.dilated_step uses them too)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_coords(tile, n_rows, T, W, BLOCK_R: tl.constexpr):
    """Rows r = (b * T + t) * W + w of one tile; masked rows are clamped to row 0 so that every
    address computed from them stays inside the tensors."""
    r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < n_rows
    r = tl.where(rmask, r, 0)
    w = r % W
    bt = r // W
    t = bt % T
    b = bt // T
    return r, rmask, b, t, w


@triton.jit
def _tap_offsets(sxt, sxc, DIL, K: tl.constexpr, KK_PAD: tl.constexpr):
    """Offset of tap k = kt * K + kc within a patch (kt * d frames, kc channels), int64; and its mask."""
    k = tl.arange(0, KK_PAD)
    kmask = k < K * K
    k = tl.where(kmask, k, 0)
    kt = (k // K).to(tl.int64)
    kc = (k % K).to(tl.int64)
    return kt * DIL * sxt + kc * sxc, kmask


@triton.jit
def _conv_tile(patch, w_ptr, b_ptr, co, comask, K: tl.constexpr, KK_PAD: tl.constexpr, PREC: tl.constexpr):
    """p = patch (BLOCK_R, KK_PAD) @ weight[co]^T + bias[co]: (BLOCK_R, BLOCK_CO) fp32.
    The weight is (C_out, K*K) contiguous in the patch's dtype."""
    k = tl.arange(0, KK_PAD)
    kmask = k < K * K
    wt = tl.load(w_ptr + co[None, :] * (K * K) + tl.where(kmask, k, 0)[:, None],
                 mask=kmask[:, None] & comask[None, :], other=0.0)  # (KK_PAD, BLOCK_CO)
    bias = tl.load(b_ptr + co, mask=comask, other=0.0).to(tl.float32)
    p = tl.dot(patch, wt, input_precision=PREC)
    return p + bias[None, :], wt


@triton.jit
def _patch_tile(x_ptr, b, t, w, rmask, sxb, sxt, sxc, S, DIL, K: tl.constexpr, KK_PAD: tl.constexpr):
    """The (BLOCK_R, KK_PAD) im2col patches of the rows (b, t, w): x[b, 0, t + kt d, w S + kc]."""
    xrow = b.to(tl.int64) * sxb + t.to(tl.int64) * sxt + (w * S).to(tl.int64) * sxc
    koff, kmask = _tap_offsets(sxt, sxc, DIL, K, KK_PAD)
    return tl.load(x_ptr + xrow[:, None] + koff[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)


@triton.jit
def _dp_tile(p, g, rmask, comask, mean, rstd, gs, c1, c2):
    """dL/dp of y = BN(relu(p)) given g = dL/dy: gs (g - c1 - xhat c2) where p > 0, with
    gs = gamma rstd, xhat = (relu(p) - mean) rstd; c1 = mean(g), c2 = mean(g xhat) in training,
    0 in eval. Masked rows and channels give 0."""
    xhat = (tl.maximum(p, 0.0) - mean[None, :]) * rstd[None, :]
    dr = gs[None, :] * (g - c1[None, :] - xhat * c2[None, :])
    keep = (p > 0) & rmask[:, None] & comask[None, :]
    return tl.where(keep, dr, 0.0)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dilated_temporal_kernel(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, out_ptr,
                             n_rows, T, W, C_out, sxb, sxt, sxc, sob, soc, sot, sow, S, DIL,
                             K: tl.constexpr, KK_PAD: tl.constexpr, PREC: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_CO: tl.constexpr):
    """y[b, co, t, w] = relu(p) * scale[co] + shift[co] for one tile of rows, all channels."""
    r, rmask, b, t, w = _row_coords(tl.program_id(0), n_rows, T, W, BLOCK_R)
    patch = _patch_tile(x_ptr, b, t, w, rmask, sxb, sxt, sxc, S, DIL, K, KK_PAD)
    orow = b.to(tl.int64) * sob + t.to(tl.int64) * sot + w.to(tl.int64) * sow
    for co0 in range(0, C_out, BLOCK_CO):
        co = co0 + tl.arange(0, BLOCK_CO)
        comask = co < C_out
        p, wt = _conv_tile(patch, w_ptr, b_ptr, co, comask, K, KK_PAD, PREC)
        scale = tl.load(scale_ptr + co, mask=comask, other=0.0)
        shift = tl.load(shift_ptr + co, mask=comask, other=0.0)
        y = tl.maximum(p, 0.0) * scale[None, :] + shift[None, :]
        tl.store(out_ptr + orow[:, None] + co.to(tl.int64)[None, :] * soc, y.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & comask[None, :])


@triton.jit
def _dilated_temporal_stats_kernel(x_ptr, w_ptr, b_ptr, mean_ptr, m2_ptr,
                                   n_rows, T, W, C_out, sxb, sxt, sxc, S, DIL, TILES,
                                   K: tl.constexpr, KK_PAD: tl.constexpr, PREC: tl.constexpr,
                                   BLOCK_R: tl.constexpr, BLOCK_CO: tl.constexpr):
    """Per program (TILES consecutive row tiles) and channel block: mean and M2 (sum of squared
    deviations) of relu(p), each tile exact, tiles merged with Chan's formula."""
    pid = tl.program_id(0)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < C_out
    n = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for i in range(TILES):
        r, rmask, b, t, w = _row_coords(pid * TILES + i, n_rows, T, W, BLOCK_R)
        patch = _patch_tile(x_ptr, b, t, w, rmask, sxb, sxt, sxc, S, DIL, K, KK_PAD)
        p, wt = _conv_tile(patch, w_ptr, b_ptr, co, comask, K, KK_PAD, PREC)
        v = tl.where(rmask[:, None], tl.maximum(p, 0.0), 0.0)
        cnt = tl.sum(rmask.to(tl.float32), axis=0)
        mean_t = tl.sum(v, axis=0) / tl.maximum(cnt, 1.0)
        dev = tl.where(rmask[:, None], v - mean_t[None, :], 0.0)
        m2_t = tl.sum(dev * dev, axis=0)
        n_new = n + cnt
        frac = cnt / tl.maximum(n_new, 1.0)
        delta = mean_t - mean
        mean = mean + delta * frac
        m2 = m2 + m2_t + delta * delta * n * frac
        n = n_new
    tl.store(mean_ptr + pid * C_out + co, mean, mask=comask)
    tl.store(m2_ptr + pid * C_out + co, m2, mask=comask)


@triton.jit
def _dilated_temporal_bwd_stats_kernel(x_ptr, w_ptr, b_ptr, g_ptr, mean_ptr, rstd_ptr, sg_ptr, sgx_ptr,
                                       n_rows, T, W, C_out, sxb, sxt, sxc, sgb, sgc, sgt, sgw, S, DIL, TILES,
                                       K: tl.constexpr, KK_PAD: tl.constexpr, PREC: tl.constexpr,
                                       BLOCK_R: tl.constexpr, BLOCK_CO: tl.constexpr):
    """Per program and channel block: sum(g) and sum(g xhat), xhat = (relu(p) - mean) rstd."""
    pid = tl.program_id(0)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < C_out
    mean = tl.load(mean_ptr + co, mask=comask, other=0.0)
    rstd = tl.load(rstd_ptr + co, mask=comask, other=0.0)
    sg = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    sgx = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for i in range(TILES):
        r, rmask, b, t, w = _row_coords(pid * TILES + i, n_rows, T, W, BLOCK_R)
        patch = _patch_tile(x_ptr, b, t, w, rmask, sxb, sxt, sxc, S, DIL, K, KK_PAD)
        p, wt = _conv_tile(patch, w_ptr, b_ptr, co, comask, K, KK_PAD, PREC)
        grow = b.to(tl.int64) * sgb + t.to(tl.int64) * sgt + w.to(tl.int64) * sgw
        mask = rmask[:, None] & comask[None, :]
        g = tl.load(g_ptr + grow[:, None] + co.to(tl.int64)[None, :] * sgc, mask=mask, other=0.0).to(tl.float32)
        xhat = (tl.maximum(p, 0.0) - mean[None, :]) * rstd[None, :]
        sg += tl.sum(g, axis=0)
        sgx += tl.sum(g * xhat, axis=0)
    tl.store(sg_ptr + pid * C_out + co, sg, mask=comask)
    tl.store(sgx_ptr + pid * C_out + co, sgx, mask=comask)


@triton.jit
def _dilated_temporal_bwd_dw_kernel(x_ptr, w_ptr, b_ptr, g_ptr, mean_ptr, rstd_ptr, gs_ptr, c1_ptr, c2_ptr,
                                    dw_ptr, db_ptr,
                                    n_rows, T, W, C_out, sxb, sxt, sxc, sgb, sgc, sgt, sgw, S, DIL, TILES,
                                    K: tl.constexpr, KK_PAD: tl.constexpr, PREC: tl.constexpr,
                                    BLOCK_R: tl.constexpr, BLOCK_CO: tl.constexpr):
    """Per program (TILES row tiles) and channel block: the partial weight gradient
    patches^T @ dp (K*K, BLOCK_CO) and bias gradient sum(dp)."""
    pid = tl.program_id(0)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < C_out
    mean = tl.load(mean_ptr + co, mask=comask, other=0.0)
    rstd = tl.load(rstd_ptr + co, mask=comask, other=0.0)
    gs = tl.load(gs_ptr + co, mask=comask, other=0.0)
    c1 = tl.load(c1_ptr + co, mask=comask, other=0.0)
    c2 = tl.load(c2_ptr + co, mask=comask, other=0.0)
    dw = tl.zeros((KK_PAD, BLOCK_CO), dtype=tl.float32)
    db = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for i in range(TILES):
        r, rmask, b, t, w = _row_coords(pid * TILES + i, n_rows, T, W, BLOCK_R)
        patch = _patch_tile(x_ptr, b, t, w, rmask, sxb, sxt, sxc, S, DIL, K, KK_PAD)
        p, wt = _conv_tile(patch, w_ptr, b_ptr, co, comask, K, KK_PAD, PREC)
        grow = b.to(tl.int64) * sgb + t.to(tl.int64) * sgt + w.to(tl.int64) * sgw
        mask = rmask[:, None] & comask[None, :]
        g = tl.load(g_ptr + grow[:, None] + co.to(tl.int64)[None, :] * sgc, mask=mask, other=0.0).to(tl.float32)
        dp = _dp_tile(p, g, rmask, comask, mean, rstd, gs, c1, c2)
        dw = tl.dot(tl.trans(patch), dp.to(patch.dtype), dw, input_precision=PREC)
        db += tl.sum(dp, axis=0)
    k = tl.arange(0, KK_PAD)
    tl.store(dw_ptr + pid * (K * K) * C_out + k[:, None] * C_out + co[None, :], dw,
             mask=(k < K * K)[:, None] & comask[None, :])
    tl.store(db_ptr + pid * C_out + co, db, mask=comask)


@triton.jit
def _dilated_temporal_bwd_dpatch_kernel(x_ptr, w_ptr, b_ptr, g_ptr, mean_ptr, rstd_ptr, gs_ptr, c1_ptr, c2_ptr,
                                        dpt_ptr,
                                        n_rows, T, W, C_out, sxb, sxt, sxc, sgb, sgc, sgt, sgw, S, DIL,
                                        K: tl.constexpr, KK_PAD: tl.constexpr, PREC: tl.constexpr,
                                        BLOCK_R: tl.constexpr, BLOCK_CO: tl.constexpr):
    """dpatches = dp @ weight for one row tile (all channels): stored transposed, dpt[k, r], fp32."""
    r, rmask, b, t, w = _row_coords(tl.program_id(0), n_rows, T, W, BLOCK_R)
    patch = _patch_tile(x_ptr, b, t, w, rmask, sxb, sxt, sxc, S, DIL, K, KK_PAD)
    grow = b.to(tl.int64) * sgb + t.to(tl.int64) * sgt + w.to(tl.int64) * sgw
    acc = tl.zeros((BLOCK_R, KK_PAD), dtype=tl.float32)
    for co0 in range(0, C_out, BLOCK_CO):
        co = co0 + tl.arange(0, BLOCK_CO)
        comask = co < C_out
        p, wt = _conv_tile(patch, w_ptr, b_ptr, co, comask, K, KK_PAD, PREC)
        mask = rmask[:, None] & comask[None, :]
        g = tl.load(g_ptr + grow[:, None] + co.to(tl.int64)[None, :] * sgc, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + co, mask=comask, other=0.0)
        rstd = tl.load(rstd_ptr + co, mask=comask, other=0.0)
        gs = tl.load(gs_ptr + co, mask=comask, other=0.0)
        c1 = tl.load(c1_ptr + co, mask=comask, other=0.0)
        c2 = tl.load(c2_ptr + co, mask=comask, other=0.0)
        dp = _dp_tile(p, g, rmask, comask, mean, rstd, gs, c1, c2)
        acc = tl.dot(dp.to(wt.dtype), tl.trans(wt), acc, input_precision=PREC)
    k = tl.arange(0, KK_PAD)
    tl.store(dpt_ptr + k.to(tl.int64)[None, :] * n_rows + r[:, None], acc,
             mask=rmask[:, None] & (k < K * K)[None, :])


@triton.jit
def _dilated_temporal_bwd_dx_kernel(dpt_ptr, dx_ptr, n_x, n_rows, T, Tp, W, C, S, DIL,
                                    K: tl.constexpr, KC_STEPS: tl.constexpr, BLOCK_X: tl.constexpr):
    """dx[b, 0, t', c'] = sum over taps (kt, kc) with t' = t + kt d, c' = w S + kc of
    dpt[kt K + kc, (b T + t) W + w]: gathered per input position. Only kc = c' mod S + j S
    (j < ceil(K / S)) can hit a window start, so the loop visits K * ceil(K / S) taps, not K*K."""
    q = tl.program_id(0) * BLOCK_X + tl.arange(0, BLOCK_X)
    qmask = q < n_x
    q = tl.where(qmask, q, 0)
    c = q % C
    bt = q // C
    tin = bt % Tp
    b = bt // Tp
    c_mod = c % S
    acc = tl.zeros((BLOCK_X,), dtype=tl.float32)
    for kt in tl.static_range(K):
        t = tin - kt * DIL
        tok = qmask & (t >= 0) & (t < T)
        t = tl.where(tok, t, 0)
        for j in tl.static_range(KC_STEPS):
            kc = c_mod + j * S
            num = c - kc  # = w S for the window that starts at w
            ok = tok & (kc < K) & (num >= 0) & (num < W * S)
            wv = tl.where(ok, num // S, 0)
            kidx = tl.where(ok, kt * K + kc, 0).to(tl.int64)
            row = (b * T + t) * W + wv
            acc += tl.load(dpt_ptr + kidx * n_rows + row, mask=ok, other=0.0)
    tl.store(dx_ptr + q, acc.to(dx_ptr.dtype.element_ty), mask=qmask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    block_r: int  # output rows (b, t, w) per tile of the forward kernel (and kernels.dilated_step)
    block_co: int  # output channels per tile of the forward kernel
    block_x: int  # input positions per program of the dx gather
    programs: int  # target number of programs of the row-reducing kernels (stats, bwd_stats, bwd_dw)
    warps: int
    # (rows, channels) per tile of the other kernels. Each holds more (rows, channels) fp32 tiles at
    # once than the forward (the backward's row-reducing kernels p, g and dp, bwd_dw also a second
    # dot's operands and its (KK_PAD, channels) accumulator, dpatch a (rows, KK_PAD) accumulator): at
    # the forward's 128 x 64 they need more than 255 registers per thread and spill to local memory.
    # These sizes compile without spills in fp16, TF32 and fp32 IEEE on sm_90 and sm_80
    # (benchmarks/README.md, kernel resources). A smaller tile does not always spill less: ptxas may
    # then aim at 64 or 128 registers and spill a few bytes (bwd_stats did at 16 x 32 and 32 x 64, not
    # at 64 x 64), so each size is one that compiled clean, not a bound to shrink below. Smaller tiles
    # of the row-reducing kernels mean more iterations of their row loop, not more programs; dpatch
    # gets more programs, each re-reading the small weight.
    stats_tile: tuple[int, int]
    bwd_stats_tile: tuple[int, int]
    bwd_dw_tile: tuple[int, int]
    dpatch_tile: tuple[int, int]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _kk_pad(k: int) -> int:
    return max(16, _next_pow2(k * k))  # tl.dot wants every dimension >= 16


_SM_COUNT: dict[int, int] = {}


def _config(x: torch.Tensor, c_out: int) -> _Config:
    if not x.is_cuda:  # interpreter: small tiles, and at least two programs to exercise the merges
        tile = (32, 16)
        return _Config(block_r=32, block_co=16, block_x=128, programs=2, warps=4, stats_tile=tile,
                       bwd_stats_tile=tile, bwd_dw_tile=tile, dpatch_tile=tile)
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _gpu_config(c_out, _SM_COUNT[idx])


def _gpu_config(c_out: int, sm_count: int) -> _Config:
    """The tiles on a GPU with ``sm_count`` SMs (benchmarks/kernel_resources.py compiles them offline)."""
    cap = max(16, _next_pow2(c_out))  # no channel block wider than C_out needs

    def tile(rows, channels):
        return rows, min(channels, cap)

    return _Config(block_r=128, block_co=min(64, cap), block_x=512, programs=4 * sm_count, warps=8,
                   stats_tile=tile(16, 32), bwd_stats_tile=tile(64, 64), bwd_dw_tile=tile(16, 32),
                   dpatch_tile=tile(32, 32))


def _dot_precision(x: torch.Tensor) -> str:
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _row_split(n_rows: int, block_r: int, target_programs: int) -> tuple[int, int]:
    """(programs, tiles per program) covering every row tile once."""
    n_tiles = triton.cdiv(n_rows, block_r)
    tiles = triton.cdiv(n_tiles, max(1, min(n_tiles, target_programs)))
    return triton.cdiv(n_tiles, tiles), tiles


def _reduce_split(cfg: _Config, tile: tuple[int, int], n_rows: int, c_out: int):
    """((BLOCK_R, BLOCK_CO), channel blocks, programs per channel block, row tiles per program) of a
    row-reducing kernel with ``tile``: about cfg.programs programs in all."""
    n_cb = triton.cdiv(c_out, tile[1])
    progs, tiles = _row_split(n_rows, tile[0], max(1, cfg.programs // n_cb))
    return tile, n_cb, progs, tiles


def _program_rows(n_rows: int, programs: int, rows_per_program: int, device) -> torch.Tensor:
    """Valid rows per program of a row split: (programs, 1) float64."""
    start = torch.arange(programs, device=device, dtype=torch.float64) * rows_per_program
    return (n_rows - start).clamp(0, rows_per_program)[:, None]


def _vec(t: torch.Tensor | None, n: int, fill: float, like: torch.Tensor) -> torch.Tensor:
    """A per-channel fp32 vector (a parameter, or `fill` where the BN has none)."""
    if t is None:
        return torch.full((n,), fill, device=like.device, dtype=torch.float32)
    return t.detach().to(torch.float32).contiguous()


# ----------------------------------------------------------------------------------------------
# Autograd Function
# ----------------------------------------------------------------------------------------------


class _DilatedTemporalFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                dilation, stride, training, momentum, eps):
        B, _, Tp, C = x.shape
        C_out, _, K, _ = weight.shape
        T = Tp - (K - 1) * dilation
        W = (C - K) // stride + 1
        n_rows = B * T * W
        dev = x.device
        cfg = _config(x, C_out)
        prec = _dot_precision(x)
        kk_pad = _kk_pad(K)
        w2 = weight.detach().reshape(C_out, K * K).to(x.dtype).contiguous()
        b = _vec(bias, C_out, 0.0, x)
        gamma = _vec(bn_weight, C_out, 1.0, x)
        beta = _vec(bn_bias, C_out, 0.0, x)
        sxb, _, sxt, sxc = x.stride()
        geom = (n_rows, T, W, C_out, sxb, sxt, sxc)

        if training:
            if n_rows <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got {n_rows} "
                                 f"rows (B={B} x T={T} x W={W})")
            (block_r, block_co), n_cb, progs, tiles = _reduce_split(cfg, cfg.stats_tile, n_rows, C_out)
            means = torch.empty(progs, C_out, device=dev, dtype=torch.float32)
            m2s = torch.empty_like(means)
            _dilated_temporal_stats_kernel[(progs, n_cb)](
                x, w2, b, means, m2s, *geom, stride, dilation, tiles,
                K=K, KK_PAD=kk_pad, PREC=prec, BLOCK_R=block_r, BLOCK_CO=block_co, num_warps=cfg.warps,
                num_stages=2)
            counts = _program_rows(n_rows, progs, tiles * block_r, dev)
            mean64 = (counts * means.double()).sum(0) / n_rows
            var64 = (m2s.double() + counts * (means.double() - mean64) ** 2).sum(0) / n_rows
            mean, var = mean64.float(), var64.float()
            update_running_stats(running_mean, running_var, mean64, var64, n_rows, momentum)
        else:
            # copies: saved for the backward, and the buffers may change before it runs
            mean = running_mean.detach().to(torch.float32, copy=True)
            var = running_var.detach().to(torch.float32, copy=True)
        rstd = torch.rsqrt(var + eps)
        scale = gamma * rstd
        shift = beta - mean * scale

        # (B, T, C_out, W) memory, seen as (B, C_out, T, W): the layer's flatten is then a view.
        out = torch.empty(B, T, C_out, W, device=dev, dtype=x.dtype).permute(0, 2, 1, 3)
        sob, soc, sot, sow = out.stride()
        _dilated_temporal_kernel[(triton.cdiv(n_rows, cfg.block_r),)](
            x, w2, b, scale, shift, out, *geom, sob, soc, sot, sow, stride, dilation,
            K=K, KK_PAD=kk_pad, PREC=prec, BLOCK_R=cfg.block_r, BLOCK_CO=cfg.block_co, num_warps=cfg.warps)

        ctx.save_for_backward(x, w2, b, gamma, mean, rstd)
        ctx.meta = (dilation, stride, training, K)
        ctx.param_dtypes = [None if t is None else t.dtype for t in (weight, bias, bn_weight, bn_bias)]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w2, b, gamma, mean, rstd = ctx.saved_tensors
        dilation, stride, training, K = ctx.meta
        need_x, need_w, need_b, need_gamma, need_beta = ctx.needs_input_grad[:5]
        B, _, Tp, C = x.shape
        C_out = w2.shape[0]
        T = Tp - (K - 1) * dilation
        W = (C - K) // stride + 1
        n_rows = B * T * W
        dev = x.device
        cfg = _config(x, C_out)
        prec = _dot_precision(x)
        kk_pad = _kk_pad(K)
        g = grad_out
        if g.dtype != x.dtype:
            g = g.to(x.dtype)
        sxb, _, sxt, sxc = x.stride()
        sgb, sgc, sgt, sgw = g.stride()
        geom = (n_rows, T, W, C_out, sxb, sxt, sxc, sgb, sgc, sgt, sgw, stride, dilation)
        # num_stages=2: the row loops gather (BLOCK_R, KK_PAD) patch tiles; deeper software pipelining
        # of those would multiply their shared memory for little gain (an untuned, cautious choice).
        meta = dict(K=K, KK_PAD=kk_pad, PREC=prec, num_warps=cfg.warps, num_stages=2)

        zeros = torch.zeros(C_out, device=dev, dtype=torch.float32)
        d_gamma = d_beta = None
        c1 = c2 = zeros
        if training or need_gamma or need_beta:
            (block_r, block_co), n_cb, progs, tiles = _reduce_split(cfg, cfg.bwd_stats_tile, n_rows, C_out)
            sg = torch.empty(progs, C_out, device=dev, dtype=torch.float32)
            sgx = torch.empty_like(sg)
            _dilated_temporal_bwd_stats_kernel[(progs, n_cb)](x, w2, b, g, mean, rstd, sg, sgx, *geom, tiles,
                                                               BLOCK_R=block_r, BLOCK_CO=block_co, **meta)
            d_beta, d_gamma = sg.double().sum(0).float(), sgx.double().sum(0).float()
            if training:
                c1, c2 = d_beta / n_rows, d_gamma / n_rows
        gs = gamma * rstd

        d_w = d_b = None
        if need_w or need_b:
            (block_r, block_co), n_cb, progs, tiles = _reduce_split(cfg, cfg.bwd_dw_tile, n_rows, C_out)
            dws = torch.empty(progs, K * K, C_out, device=dev, dtype=torch.float32)
            dbs = torch.empty(progs, C_out, device=dev, dtype=torch.float32)
            _dilated_temporal_bwd_dw_kernel[(progs, n_cb)](x, w2, b, g, mean, rstd, gs, c1, c2, dws, dbs,
                                                           *geom, tiles, BLOCK_R=block_r, BLOCK_CO=block_co, **meta)
            d_w = dws.sum(0).t().reshape(C_out, 1, K, K)
            d_b = dbs.sum(0)

        d_x = None
        if need_x:
            dpt = torch.empty(K * K, n_rows, device=dev, dtype=torch.float32)
            block_r, block_co = cfg.dpatch_tile
            _dilated_temporal_bwd_dpatch_kernel[(triton.cdiv(n_rows, block_r),)](
                x, w2, b, g, mean, rstd, gs, c1, c2, dpt, *geom, BLOCK_R=block_r, BLOCK_CO=block_co, **meta)
            d_x = torch.empty(B, 1, Tp, C, device=dev, dtype=x.dtype)
            n_x = B * Tp * C
            _dilated_temporal_bwd_dx_kernel[(triton.cdiv(n_x, cfg.block_x),)](
                dpt, d_x, n_x, n_rows, T, Tp, W, C, stride, dilation,
                K=K, KC_STEPS=triton.cdiv(K, stride), BLOCK_X=cfg.block_x, num_warps=4)

        dt = ctx.param_dtypes

        def cast(grad, i, need):
            return grad.to(dt[i]) if need and grad is not None and dt[i] is not None else None

        return (d_x, cast(d_w, 0, need_w), cast(d_b, 1, need_b), cast(d_gamma, 2, need_gamma),
                cast(d_beta, 3, need_beta), None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Public API: launcher and its reference twin (rtsed.ops.dilated_temporal calls the launcher)
# ----------------------------------------------------------------------------------------------


def _check(x, weight, dilation, stride, params) -> None:
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"dilated_temporal expects x (B, 1, T + (K - 1) d, C), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"dilated_temporal runs in float32 or float16, got {x.dtype}")
    if not x.is_cuda and not _INTERPRETED:
        raise RuntimeError(f"dilated_temporal's Triton kernels need a CUDA tensor (got {x.device}), or "
                           "TRITON_INTERPRET=1 set before kernels.dilated_temporal is imported")
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be (C_out, 1, K, K), got {tuple(weight.shape)}")
    if dilation < 1 or stride < 1:
        raise ValueError(f"dilation {dilation} and stride {stride} must be >= 1")
    K = weight.shape[2]
    if K > x.shape[3]:
        raise ValueError(f"kernel {K} exceeds the {x.shape[3]} input channels")
    if x.shape[2] < (K - 1) * dilation + 1:
        raise ValueError(f"x has {x.shape[2]} frames, fewer than the receptive field {(K - 1) * dilation + 1}: "
                         "pad time first")
    for p in params:
        if p is not None and p.device != x.device:
            raise ValueError(f"parameters on {p.device}, input on {x.device}")


def dilated_temporal(x, weight, bias, bn_weight, bn_bias, bn_running_mean, bn_running_var, *,
                     dilation: int, stride: int, training: bool, momentum: float = 0.1, eps: float = 1e-5):
    """BN(relu(conv2d(x, weight, bias, stride=(1, S), dilation=(d, 1)))) in Triton, differentiable.

    x: (B, 1, T + (K - 1) d, C) -> (B, C_out, T, W). training: BN uses (and, when running
    statistics are given, updates with ``momentum``, the exponential-average factor) the batch
    statistics over (B, T, W); otherwise the running statistics. As ``F.batch_norm``."""
    _check(x, weight, dilation, stride, (weight, bias, bn_weight, bn_bias, bn_running_mean, bn_running_var))
    if not training and (bn_running_mean is None or bn_running_var is None):
        raise ValueError("eval-mode BatchNorm needs running statistics")
    return _DilatedTemporalFn.apply(x, weight, bias, bn_weight, bn_bias, bn_running_mean, bn_running_var,
                                    int(dilation), int(stride), bool(training), float(momentum), float(eps))


def dilated_temporal_ref(x, weight, bias, bn_weight, bn_bias, bn_running_mean, bn_running_var, *,
                         dilation: int, stride: int, training: bool, momentum: float = 0.1, eps: float = 1e-5):
    """The same op in stock torch (as ``rtsed.ops.dilated_temporal_ref``, which the layer's
    ``DilatedTemporal.conv_relu_bn`` runs)."""
    y = F.conv2d(x, weight, bias, stride=(1, stride), dilation=(dilation, 1))
    return F.batch_norm(F.relu(y), bn_running_mean, bn_running_var, bn_weight, bn_bias, training, momentum, eps)
