"""One streaming step of f_dil over its ring buffer fused with the per-frame classifier (eval mode).

Op (``dilated_step_logits_ref`` is the twin in stock torch: kernels.dilated_step's ring step, then
``F.linear``)::

    ring[:, (write_pos + j) % capacity] = frames[:, j]                      j < n, in place
    y[b, j, c, w] = BN_eval(relu(conv over the K taps x K channels from w S))[c]   (as kernels.dilated_step)
    logits[b, j, k] = lin_bias[k] + sum_{c, w} lin_weight[k, c * W + w] y[b, j, c, w]

Shapes: frames (B, n, C) new input frames (CNN channels), ring (B, capacity, C) with
capacity >= (K - 1) d + n; conv weight (C_out, 1, K, K); lin_weight (n_classes, C_out * W), the
classifier's channel-major columns as the layer flattens f_dil's output, W = (C - K) // S + 1;
logits (B, n, n_classes). The caller advances the write position by n afterwards.

Why fused: f_dil's output is C_out * W values per frame (21,504 for dnd_7_10) against n_classes
logits (16), so writing it out and reading it back for the classifier, as a ring step followed
by ``F.linear`` does, costs B * n * C_out * W elements of memory and traffic per step: 13.8 GB in
fp32 for 10,000 streams x 16 frames, past the int32 offsets of the kernels. Here each program
keeps a tile of frames' logits in registers and adds every (c, w) block of y into them as soon
as it is computed, so beyond the ring the step allocates O(B * n * n_classes).

How it runs: the new frames are written with at most two slice copies (the ring may wrap), then
one kernel. Program (frame tile, w range, class block) holds BLOCK_F frames (rows b * n + j); for
each block of BLOCK_CO output channels (its conv weight, bias and BN affine loaded once) and each
w in its range: the frames' K x K patches at w S are gathered from the ring with the slot
arithmetic of kernels.dilated_step, p = patches @ conv_weight^T + bias (tl.dot), y = relu(p)
scale + shift (BN from the running statistics), and acc += y @ lin_weight[classes, c * W + w]^T
(a second tl.dot, (BLOCK_F, BLOCK_CO) @ (BLOCK_CO, BLOCK_K)). fp32 accumulation, every load
masked, every offset into the ring, the classifier and the output int64. When there are few frame
tiles (a handful of streams) the W axis is split over programs so that the GPU is filled; each
split writes its partial logits (W_SPLIT, B n, n_classes) and torch sums them (deterministic, no
atomics); the classifier bias is added by the first split only. More classes than
``MAX_CLASS_BLOCK`` run in class blocks, each recomputing the conv (a model with hundreds of
classes pays conv work per block instead of registers).

Limits: eval-mode BatchNorm (running statistics) only; ring and frames float32 or float16 (same
dtype); in fp16 y is rounded to fp16 before the classifier's dot, as the unfused step stores it;
parameters any float dtype (the conv and classifier weights are cast to the ring's dtype for
tl.dot); CUDA tensors, or CPU tensors when kernels.dilated_temporal was imported under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import dilated_temporal as _dt
from kernels.dilated_step import _check, _ring_taps, _write_ring, dilated_step_ref

# As in kernels.dilated_temporal: what the decorator below saw.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Classes per program: the (BLOCK_F, BLOCK_K) fp32 accumulator lives in registers.
MAX_CLASS_BLOCK = 64


# write_pos changes every step, n_frames, N and W_PER_PROGRAM with the step's size and the number of
# streams in it: one compiled variant for all (n_frames == 1, a live stream's step, specialised,
# also spilled 4 B in fp32 IEEE on sm_90)
@triton.jit(do_not_specialize=["write_pos", "n_frames", "N", "W_PER_PROGRAM"])
def _dilated_step_logits_kernel(ring_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, rm_ptr, rv_ptr, lin_ptr, lin_b_ptr,
                                out_ptr, n_frames, N, W, C_out, n_classes, CAP, write_pos, srb, srt, src,
                                slk, sli, W_PER_PROGRAM, S, DIL, eps,
                                K: tl.constexpr, KK_PAD: tl.constexpr, PREC: tl.constexpr,
                                BLOCK_F: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial logits of one frame tile over one w range and class block:
    out[split, b * N + j, k] = sum over w in the range, all c, of lin[k, c W + w] y[b, j, c, w]
    (+ lin_bias[k] in split 0)."""
    split = tl.program_id(1)
    f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = f < n_frames
    f = tl.where(fmask, f, 0)  # masked frames read frame 0: every address stays inside the ring
    b = f // N
    j = f % N
    cls = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    clsmask = cls < n_classes
    cls = tl.where(clsmask, cls, 0)

    slot, k, kc, kmask = _ring_taps(write_pos, j, CAP, DIL, K, KK_PAD)
    tap = (b.to(tl.int64) * srb)[:, None] + slot.to(tl.int64) * srt + kc.to(tl.int64)[None, :] * src
    tap_mask = fmask[:, None] & kmask[None, :]

    w_lo = split * W_PER_PROGRAM
    w_hi = tl.minimum(w_lo + W_PER_PROGRAM, W)
    acc = tl.zeros((BLOCK_F, BLOCK_K), dtype=tl.float32)
    for co0 in range(0, C_out, BLOCK_CO):
        co = co0 + tl.arange(0, BLOCK_CO)
        comask = co < C_out
        co = tl.where(comask, co, 0)
        wt = tl.load(w_ptr + co[None, :] * (K * K) + k[:, None], mask=kmask[:, None] & comask[None, :],
                     other=0.0)  # (KK_PAD, BLOCK_CO)
        bias = tl.load(b_ptr + co, mask=comask, other=0.0).to(tl.float32)
        gamma = tl.load(gamma_ptr + co, mask=comask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + co, mask=comask, other=0.0).to(tl.float32)
        mean = tl.load(rm_ptr + co, mask=comask, other=0.0).to(tl.float32)
        var = tl.load(rv_ptr + co, mask=comask, other=1.0).to(tl.float32)
        scale = gamma / tl.sqrt(var + eps)  # masked channels: scale 0, shift 0, so y 0
        shift = beta - mean * scale
        # lin[k, c W + w] for this channel block at w = 0; + w * sli per position
        lin_base = cls.to(tl.int64)[None, :] * slk + (co.to(tl.int64) * W)[:, None] * sli
        lin_mask = comask[:, None] & clsmask[None, :]
        for w in range(w_lo, w_hi):
            patch = tl.load(ring_ptr + tap + (w * S).to(tl.int64) * src, mask=tap_mask, other=0.0)
            p = tl.dot(patch, wt, input_precision=PREC) + bias[None, :]
            y = tl.maximum(p, 0.0) * scale[None, :] + shift[None, :]
            lin = tl.load(lin_ptr + lin_base + w * sli, mask=lin_mask, other=0.0)  # (BLOCK_CO, BLOCK_K)
            acc = tl.dot(y.to(patch.dtype), lin.to(patch.dtype), acc, input_precision=PREC)
    lin_bias = tl.load(lin_b_ptr + cls, mask=clsmask, other=0.0).to(tl.float32)
    acc += tl.where(split == 0, lin_bias, 0.0)[None, :]  # once, not once per split
    out = out_ptr + (split.to(tl.int64) * n_frames + f.to(tl.int64))[:, None] * n_classes + cls[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=fmask[:, None] & clsmask[None, :])


@dataclass(frozen=True)
class _Config:
    block_f: int  # frames (b, j) per program
    block_co: int  # output channels per conv tile
    programs: int  # fewer programs than this split the W axis
    warps: int  # for a full frame tile (block_f frames)
    stages: int  # software pipelining of the w loop's gathers (full frame tiles)


_SM_COUNT: dict[int, int] = {}


def _config(ring: torch.Tensor, c_out: int) -> _Config:
    if not ring.is_cuda:  # interpreter: small tiles; 4 programs, so small steps split W
        return _Config(block_f=16, block_co=16, programs=4, warps=4, stages=1)
    idx = ring.device.index if ring.device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _gpu_config(c_out, _SM_COUNT[idx], ring.dtype)


def _gpu_config(c_out: int, sm_count: int, dtype: torch.dtype) -> _Config:
    """The tiles on a GPU with ``sm_count`` SMs for a ring of ``dtype`` (benchmarks/kernel_resources.py
    compiles them offline). Untimed: 64 frames x 32 channels per dot, two programs per SM before W
    is split; 64 x 64 tiles spilled in fp32 at K = 7 (up to 472 B per thread at 4 or 8 warps), these
    do not. Full tiles run 8 warps in fp32 (at 4, K = 7 spills: 68-140 B in TF32, 760 B and more in
    IEEE) and 4 in fp16: at 8, ptxas held the fp16 tile at K = 5 to 128 registers on sm_80 and
    spilled 4 B, while at 4 warps it takes 142-210 registers on sm_90 and sm_80 without spilling
    (at most 210 x 128 threads: still two resident programs per SM)."""
    return _Config(block_f=64, block_co=min(32, max(16, _dt._next_pow2(c_out))), programs=2 * sm_count,
                   warps=4 if dtype == torch.float16 else 8, stages=2)


def _w_split(frame_tiles: int, class_blocks: int, width: int, programs: int) -> tuple[int, int]:
    """(splits, w per program): the fewest splits of the W axis that make at least ``programs``
    programs, at most one split per w."""
    wanted = min(width, max(1, triton.cdiv(programs, frame_tiles * class_blocks)))
    per = triton.cdiv(width, wanted)
    return triton.cdiv(width, per), per


def _check_classifier(lin_weight, lin_bias, c_out: int, width: int) -> None:
    if lin_weight.dim() != 2 or lin_weight.shape[1] != c_out * width:
        raise ValueError(f"the classifier weight must be (n_classes, C_out * W) = (n_classes, {c_out} * {width}), "
                         f"got {tuple(lin_weight.shape)}: pass the nn.Linear that follows f_dil")
    if lin_bias is not None and tuple(lin_bias.shape) != (lin_weight.shape[0],):
        raise ValueError(f"the classifier bias must be ({lin_weight.shape[0]},), got {tuple(lin_bias.shape)}")


def dilated_step_logits(frames, ring, write_pos: int, weight, bias, bn_weight, bn_bias, bn_running_mean,
                        bn_running_var, lin_weight, lin_bias, *, dilation: int, stride: int,
                        eps: float = 1e-5) -> torch.Tensor:
    """Write frames (B, n, C) into ring (B, capacity, C) at write_pos (in place) and return the
    classifier's logits for them, (B, n, n_classes), in the ring's dtype. Eval-mode BN."""
    _check(frames, ring, write_pos, weight, dilation, stride)
    if _INTERPRETED != _dt._INTERPRETED:
        raise RuntimeError("kernels.dilated_step_logits and kernels.dilated_temporal were imported under different "
                           "TRITON_INTERPRET settings: import (or reload) both under the same one")
    B, n, C = frames.shape
    C_out, _, K, _ = weight.shape
    W = (C - K) // stride + 1
    _check_classifier(lin_weight, lin_bias, C_out, W)
    n_classes = lin_weight.shape[0]
    _write_ring(ring, frames, write_pos)
    n_frames = B * n
    if n_frames == 0 or n_classes == 0:
        return torch.zeros(B, n, n_classes, device=ring.device, dtype=ring.dtype)
    cfg = _config(ring, C_out)
    block_f = min(cfg.block_f, max(16, triton.next_power_of_2(n_frames)))
    # Small steps (fewer frames than a full tile): warps in proportion to the frame tile, at least
    # 4 (one warpgroup), and no software pipelining of the w loop. A 16-frame tile at 8 warps, or
    # at 4 warps with 2 stages, was held to 128 registers and spilled 4-20 B in TF32 on sm_90.
    small = block_f < cfg.block_f
    warps = max(4, cfg.warps * block_f // cfg.block_f) if small else cfg.warps
    stages = 1 if small else cfg.stages
    block_k = min(MAX_CLASS_BLOCK, max(16, triton.next_power_of_2(n_classes)))
    frame_tiles, class_blocks = triton.cdiv(n_frames, block_f), triton.cdiv(n_classes, block_k)
    splits, w_per_program = _w_split(frame_tiles, class_blocks, W, cfg.programs)
    # One split writes the logits in place; several write fp32 partials that are summed below.
    out = torch.empty(splits, n_frames, n_classes, device=ring.device,
                      dtype=ring.dtype if splits == 1 else torch.float32)
    w2 = weight.detach().reshape(C_out, K * K).to(ring.dtype).contiguous()
    lin = lin_weight.detach()
    lin_b = _dt._vec(lin_bias, n_classes, 0.0, ring)
    srb, srt, src = ring.stride()
    _dilated_step_logits_kernel[(frame_tiles, splits, class_blocks)](
        ring, w2, _dt._vec(bias, C_out, 0.0, ring), _dt._vec(bn_weight, C_out, 1.0, ring),
        _dt._vec(bn_bias, C_out, 0.0, ring), bn_running_mean.detach(), bn_running_var.detach(), lin, lin_b, out,
        n_frames, n, W, C_out, n_classes, ring.shape[1], write_pos, srb, srt, src, lin.stride(0), lin.stride(1),
        w_per_program, stride, dilation, float(eps),
        K=K, KK_PAD=_dt._kk_pad(K), PREC=_dt._dot_precision(ring), BLOCK_F=block_f, BLOCK_CO=cfg.block_co,
        BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    logits = out[0] if splits == 1 else out.sum(0).to(ring.dtype)
    return logits.view(B, n, n_classes)


def dilated_step_logits_ref(frames, ring, write_pos: int, weight, bias, bn_weight, bn_bias, bn_running_mean,
                            bn_running_var, lin_weight, lin_bias, *, dilation: int, stride: int,
                            eps: float = 1e-5) -> torch.Tensor:
    """The same step in stock torch: kernels.dilated_step's reference ring step (f_dil's whole
    output, (B, n, C_out * W)), then the classifier."""
    y = dilated_step_ref(frames, ring, write_pos, weight, bias, bn_weight, bn_bias, bn_running_mean,
                         bn_running_var, dilation=dilation, stride=stride, eps=eps)
    return F.linear(y, lin_weight, lin_bias)
