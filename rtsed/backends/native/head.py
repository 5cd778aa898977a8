"""Wrappers of head.cpp: the backward passes of dnd's fused head (rtsed.backends.cpu_head), and its
eval-mode forward straight to logits (``head_logits``: streaming steps and offline inference).

A time chunk of n output frames has B n W patch rows ordered (b, t, w): r (its ReLU output) and
dL/dz are (B n W, C), dL/dlogits (B n, n_classes), the BN-folded classifier (W, n_classes, C),
C = f_dil's output channels. float32 or float64; per-channel sums come back as float64 (C,)
tensors. Each call uses ``torch.get_num_threads()`` threads and runs under a profiler label
``rtsed::native::<name>``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rtsed.backends.native import call, channel_sums, check, declare

declare("head_relu_grad", ["p", "p", "p", "p", "p", "p", "int", "i64", "i64", "i64", "i64", "p", "int"])
declare("class_products", ["p", "p", "i64", "i64", "i64", "p", "int"])
declare("head_logits", ["p", "i64", "i64", "p", "p", "p", "p", "i64", "i64", "i64", "i64", "i64", "i64", "i64",
                        "i64", "p", "int"])
declare("head_conv_backward", ["p", "i64", "i64", "i64", "i64", "i64", "i64", "i64", "p", "p", "p", "p", "p", "p",
                               "int", "i64", "i64", "i64", "i64", "p", "p", "p", "int", "p"])
declare("head_conv_relu_stats", ["p", "i64", "i64", "i64", "i64", "i64", "i64", "i64", "p", "p", "i64", "i64",
                                 "i64", "i64", "p", "p", "p", "int"])
declare("patch_scatter", ["p", "p", "i64", "i64", "i64", "i64", "i64", "i64", "i64", "i64", "i64", "int"])


def head_relu_grad(r: Tensor, g: Tensor, folded: Tensor, alpha: Tensor | None = None, beta: Tensor | None = None,
                   out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """dL/dz (B n W, C) of a chunk, from r (B n W, C) = its ReLU output, rows (b, t, w):
    dL/dz[(bt, w), c] = r > 0 ? (g @ folded[w])[bt, c] + alpha[c] + beta[c] r : 0, given
    g (B n, n_classes) = dL/dlogits of the chunk, folded (W, n_classes, C) and BN's batch-statistics
    terms alpha, beta (C,) (both None for eval-mode BN: zero). Written to ``out`` (B n W, C) when
    given (it may be r itself). Returns (dL/dz, float64 (C,) per-channel sum of dL/dz: the conv's
    bias gradient)."""
    if (alpha is None) != (beta is None):
        raise ValueError("head_relu_grad: pass both alpha and beta, or neither")
    out = torch.empty_like(r) if out is None else out
    extra = {} if alpha is None else {"alpha": alpha, "beta": beta}
    check("head_relu_grad", r.dtype, r=r, g=g, folded=folded, out=out, **extra)
    frames, n_classes = g.shape
    width, channels = folded.shape[0], r.shape[-1]
    if r.dim() != 2 or folded.shape != (width, n_classes, channels) or r.shape[0] != frames * width:
        raise ValueError(f"head_relu_grad: r {tuple(r.shape)}, g {tuple(g.shape)}, folded {tuple(folded.shape)} "
                         "do not match (B n W, C), (B n, n_classes), (W, n_classes, C)")
    if out.shape != r.shape:
        raise ValueError(f"head_relu_grad: out {tuple(out.shape)} is not r's {tuple(r.shape)}")
    if alpha is not None and (alpha.shape != (channels,) or beta.shape != (channels,)):
        raise ValueError(f"head_relu_grad: alpha {tuple(alpha.shape)} / beta {tuple(beta.shape)} are not ({channels},)")
    (total,) = channel_sums(channels, 1)
    batch = alpha is not None
    call("head_relu_grad", r.dtype, r.data_ptr(), out.data_ptr(), g.data_ptr(), folded.data_ptr(),
         alpha.data_ptr() if batch else None, beta.data_ptr() if batch else None, int(batch), frames, width,
         channels, n_classes, total.data_ptr(), torch.get_num_threads())
    return out, total


def class_products_(out: Tensor, g: Tensor, r: Tensor) -> Tensor:
    """In place: out (n_classes, N) += g^T r, g (B n, n_classes) = dL/dlogits of a chunk, r (B n, N)
    its ReLU output with frames as rows (N = W C). Returns out. Deterministic whatever the thread
    count (threads split the columns)."""
    check("class_products", out.dtype, out=out, g=g, r=r)
    frames, n_classes = g.shape
    if r.dim() != 2 or r.shape[0] != frames or out.shape != (n_classes, r.shape[1]):
        raise ValueError(f"class_products_: out {tuple(out.shape)}, g {tuple(g.shape)}, r {tuple(r.shape)} "
                         "do not match (n_classes, N), (B n, n_classes), (B n, N)")
    call("class_products", out.dtype, r.data_ptr(), g.data_ptr(), frames, r.shape[1], n_classes, out.data_ptr(),
         torch.get_num_threads())
    return out


def patch_scatter_(dx: Tensor, d_patches: Tensor, t0: int, t1: int, kernel: int, dilation: int, stride: int,
                   width: int) -> None:
    """In place: dx (B, Tp, C) += the transpose of ``rtsed.backends.cpu_head.dilated_patches`` for output
    frames [t0, t1): d_patches (B (t1 - t0) W, K K), rows (b, t, w), columns (i, j) add into
    dx[b, t + i dilation, w stride + j]. Deterministic whatever the thread count."""
    check("patch_scatter", dx.dtype, dx=dx, d_patches=d_patches)
    b, tp, c = dx.shape
    n = t1 - t0
    if d_patches.shape != (b * n * width, kernel * kernel):
        raise ValueError(f"patch_scatter_: d_patches {tuple(d_patches.shape)} is not "
                         f"({b} x {n} x {width}, {kernel * kernel})")
    if not (0 <= t0 < t1 and t1 - 1 + (kernel - 1) * dilation < tp and (width - 1) * stride + kernel <= c):
        raise ValueError(f"patch_scatter_: frames [{t0}, {t1}) with kernel {kernel}, dilation {dilation}, "
                         f"stride {stride}, width {width} reach outside dx {tuple(dx.shape)}")
    call("patch_scatter", dx.dtype, dx.data_ptr(), d_patches.data_ptr(), b, tp, c, t0, n, kernel, dilation, stride,
         width, torch.get_num_threads())


def vector_lanes(dtype: torch.dtype) -> int:
    """Values per 64-byte vector of the kernels: 16 float32, 8 float64."""
    return 64 // dtype.itemsize


def taps_major_conv(conv_weight: Tensor, conv_bias: Tensor) -> tuple[Tensor, Tensor]:
    """f_dil's conv weight (C_out, 1, K, K) and bias (C_out,) as the forward kernels read them:
    taps-major (K K, Cp) and (Cp,), zero-padded to Cp channels, a multiple of 4 vectors (padded
    channels compute ReLU(0) = 0)."""
    c_out = conv_weight.shape[0]
    lanes = vector_lanes(conv_weight.dtype)
    cp = -(-c_out // (4 * lanes)) * 4 * lanes
    taps = conv_weight.reshape(c_out, -1).t()  # (K K, C_out)
    wt = taps.new_zeros(taps.shape[0], cp)
    wt[:, :c_out] = taps
    cb = conv_bias.new_zeros(cp)
    cb[:c_out] = conv_bias
    return wt, cb


def head_logits_weights(conv_weight: Tensor, conv_bias: Tensor, folded: Tensor, folded_bias: Tensor, width: int
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``head_logits``'s operands from f_dil's conv weight (C_out, 1, K, K), bias (C_out,), and the
    BN-folded classifier (n_classes, C_out * W) channel-major (index c * W + w, as the model
    flattens), bias (n_classes,): taps-major conv weight (K K, Cp), bias (Cp,), classifier
    (W, Cp, NCp) and bias (NCp,), zero-padded to Cp channels (a multiple of 4 vectors) and NCp
    classes (a multiple of one vector). Padded channels have zero weight and bias, so ReLU gives 0
    and their zero classifier rows add exactly nothing; padded classes are sliced off."""
    c_out, n_classes = conv_weight.shape[0], folded.shape[0]
    lanes = vector_lanes(conv_weight.dtype)
    wt, cb = taps_major_conv(conv_weight, conv_bias)
    cp = wt.shape[1]
    ncp = -(-n_classes // lanes) * lanes
    lin = folded.new_zeros(width, cp, ncp)
    lin[:, :c_out, :n_classes] = folded.view(n_classes, c_out, width).permute(2, 1, 0)
    lb = folded_bias.new_zeros(ncp)
    lb[:n_classes] = folded_bias
    return wt, cb, lin, lb


def head_logits(x: Tensor, n: int, weights: tuple[Tensor, Tensor, Tensor, Tensor], n_classes: int, kernel: int,
                dilation: int, stride: int) -> Tensor:
    """Eval-mode f_dil -> ReLU -> BN-folded classifier, straight to logits (B, n, n_classes).

    x (B, Tx, C): f_dil's time-padded input (CNN frames, C channels contiguous; any batch and time
    strides, so a view of a ring buffer works); output frame t reads x[b, t + i dilation,
    w stride + j] for taps i, j < kernel, so Tx >= n + (kernel - 1) dilation. ``weights`` from
    ``head_logits_weights`` (their W gives the output width). Runs on ``torch.get_num_threads()``
    threads; each logit is summed in one fixed order whatever the thread count."""
    wt, cb, lin, lb = weights
    check("head_logits", x.dtype, wt=wt, cb=cb, lin=lin, lb=lb)
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"head_logits: x must be (B, T, C) with contiguous channels; got shape {tuple(x.shape)}, "
                         f"strides {x.stride()}")
    b, t_in, c = x.shape
    width, cp, ncp = lin.shape
    if wt.shape != (kernel * kernel, cp) or n < 0 or n + (kernel - 1) * dilation > t_in \
            or (width - 1) * stride + kernel > c or n_classes > ncp:
        raise ValueError(f"head_logits: {n} frames of a {kernel}x{kernel} conv (dilation {dilation}, stride "
                         f"{stride}, width {width}) do not fit x {tuple(x.shape)} / weights {tuple(wt.shape)}")
    out = x.new_empty(b, n, ncp)
    if n:
        call("head_logits", x.dtype, x.data_ptr(), x.stride(0), x.stride(1), wt.data_ptr(), cb.data_ptr(),
             lin.data_ptr(), lb.data_ptr(), b, n, kernel, dilation, stride, width, cp, ncp, out.data_ptr(),
             torch.get_num_threads())
    return out[..., :n_classes] if ncp != n_classes else out


CONV_KERNELS = (3, 5, 7)  # the K x K sizes head_conv_backward is compiled for


def padded_conv_weight(conv_weight: Tensor) -> Tensor:
    """f_dil's conv weight (C_out, 1, K, K) as ``head_conv_backward`` reads it: (C_out, KKp), each
    channel's K K taps zero-padded to whole vectors."""
    c_out = conv_weight.shape[0]
    taps = conv_weight.reshape(c_out, -1)
    lanes = vector_lanes(conv_weight.dtype)
    out = taps.new_zeros(c_out, -(-taps.shape[1] // lanes) * lanes)
    out[:, :taps.shape[1]] = taps
    return out


def head_conv_backward(x: Tensor, t0: int, t1: int, r: Tensor, g: Tensor, folded: Tensor, alpha: Tensor | None,
                       beta: Tensor | None, conv_weight_padded: Tensor, kernel: int, dilation: int, stride: int,
                       d_patches: Tensor, d_weight: Tensor) -> Tensor:
    """The conv part of cpu_head's backward for output frames [t0, t1) (a time chunk of n frames),
    in one pass: dL/dz of the chunk as ``head_relu_grad`` defines it (never written to memory),
    the patch gradients d_patches (B n W, K K) = dL/dz @ W_conv (written; ``patch_scatter_`` adds
    them into dx), and d_weight (C_out, K K) += dL/dz^T @ patches (patches read from x in place).

    x (B, Tp, C_in) the time-padded input; r (B n W, C_out) the chunk's ReLU output, rows (b, t, w);
    g (B n, n_classes) its dL/dlogits; folded (W, n_classes, C_out); alpha, beta (C_out,) BN's
    batch-statistics terms or both None (eval-mode BN); conv_weight_padded from
    ``padded_conv_weight``. Returns the float64 (C_out,) per-channel sum of dL/dz (the conv's bias
    gradient). d_weight's sums are per thread, merged in thread order: it depends on the thread
    count by rounding only (as a threaded GEMM's does); d_patches and the sums do not."""
    if (alpha is None) != (beta is None):
        raise ValueError("head_conv_backward: pass both alpha and beta, or neither")
    extra = {} if alpha is None else {"alpha": alpha, "beta": beta}
    check("head_conv_backward", x.dtype, x=x, r=r, g=g, folded=folded, conv_weight_padded=conv_weight_padded,
          d_patches=d_patches, d_weight=d_weight, **extra)
    b, tp, c_in = x.shape
    n = t1 - t0
    width, n_classes, c_out = folded.shape
    kk = kernel * kernel
    lanes = vector_lanes(x.dtype)
    if (kernel not in CONV_KERNELS or not 0 <= t0 < t1 or t1 - 1 + (kernel - 1) * dilation >= tp
            or (width - 1) * stride + kernel > c_in):
        raise ValueError(f"head_conv_backward: frames [{t0}, {t1}) of a {kernel}x{kernel} conv (dilation {dilation}, "
                         f"stride {stride}, width {width}) do not fit x {tuple(x.shape)} (kernels: {CONV_KERNELS})")
    if (r.shape != (b * n * width, c_out) or g.shape != (b * n, n_classes)
            or conv_weight_padded.shape != (c_out, -(-kk // lanes) * lanes)
            or d_patches.shape != (b * n * width, kk) or d_weight.shape != (c_out, kk)):
        raise ValueError(f"head_conv_backward: r {tuple(r.shape)}, g {tuple(g.shape)}, weight "
                         f"{tuple(conv_weight_padded.shape)}, d_patches {tuple(d_patches.shape)}, d_weight "
                         f"{tuple(d_weight.shape)} do not match (B n W, C), (B n, n_classes), (C, K K padded), "
                         f"(B n W, K K), (C, K K) for B {b}, n {n}, W {width}, C {c_out}")
    if alpha is not None and (alpha.shape != (c_out,) or beta.shape != (c_out,)):
        raise ValueError(f"head_conv_backward: alpha {tuple(alpha.shape)} / beta {tuple(beta.shape)} are not ({c_out},)")
    (total,) = channel_sums(c_out, 1)
    status = torch.zeros(1, dtype=torch.int32)
    batch = alpha is not None
    call("head_conv_backward", x.dtype, x.data_ptr(), tp, c_in, t0, n, kernel, dilation, stride, r.data_ptr(),
         g.data_ptr(), folded.data_ptr(), alpha.data_ptr() if batch else None, beta.data_ptr() if batch else None,
         conv_weight_padded.data_ptr(), int(batch), b, width, c_out, n_classes, d_patches.data_ptr(),
         d_weight.data_ptr(), total.data_ptr(), torch.get_num_threads(), status.data_ptr())
    if int(status):
        raise ValueError(f"native head_conv_backward: kernel size not in {CONV_KERNELS}")
    return total


def head_conv_relu_stats(x: Tensor, t0: int, t1: int, conv: tuple[Tensor, Tensor], kernel: int, dilation: int,
                         stride: int, width: int, out: Tensor) -> tuple[Tensor, Tensor]:
    """Training forward of f_dil's conv for output frames [t0, t1) (a time chunk of n frames):
    out (B n W, C_out), rows (b, t, w), = ReLU(conv) with the tap x[b, t + i dilation, w stride + j]
    of x (B, Tp, C_in) the time-padded input; ``conv`` from ``taps_major_conv``. Returns float64
    (C_out,) sums of out and of out^2 over its rows (BN's batch statistics). Sums depend on the
    thread count by rounding only; out does not."""
    wt, cb = conv
    check("head_conv_relu_stats", x.dtype, x=x, wt=wt, cb=cb, out=out)
    b, tp, c_in = x.shape
    n, c_out, cp = t1 - t0, out.shape[-1], wt.shape[1]
    if (wt.shape[0] != kernel * kernel or not 0 <= t0 < t1 or t1 - 1 + (kernel - 1) * dilation >= tp
            or (width - 1) * stride + kernel > c_in or c_out > cp or out.shape != (b * n * width, c_out)):
        raise ValueError(f"head_conv_relu_stats: frames [{t0}, {t1}) of a {kernel}x{kernel} conv (dilation "
                         f"{dilation}, stride {stride}, width {width}) do not fit x {tuple(x.shape)}, weight "
                         f"{tuple(wt.shape)} and out {tuple(out.shape)}")
    total, squares = channel_sums(c_out, 2)
    call("head_conv_relu_stats", x.dtype, x.data_ptr(), tp, c_in, t0, n, kernel, dilation, stride, wt.data_ptr(),
         cb.data_ptr(), b, width, c_out, cp, out.data_ptr(), total.data_ptr(), squares.data_ptr(),
         torch.get_num_threads())
    return total, squares
