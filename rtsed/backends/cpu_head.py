"""f_dil + BatchNorm + classifier as one chunked computation: the CPU fast path of dnd's head.

The reference composition (``rtsed.ops.dilated_head_ref``: ``classifier(temporal(h))``) materialises f_dil's output
(B, C_out, T, W) three times over (conv, ReLU, BN), 1.4 GB each for a training batch of
16 x 1024 frames, and BatchNorm's backward over it alone took 1.2 s of a 8.3 s train step on
this project's 2-core CPU. Here the same arithmetic is arranged so that nothing of that size is
written more than once:

- the dilated convolution is a GEMM: each output position (t, w) reads a K x K patch
  x[t + i d, w S + j] of the time-padded input (B, T + (K - 1) d, C), so
  z = patches (rows, K K) @ W_conv^T (K K, C_out) + b, rows ordered (b, t, w);
- BatchNorm is a per-channel affine y = a r + b of r = ReLU(z) (a = gamma / std,
  b = beta - mean a, batch statistics in training, running ones in eval), so it folds into the
  classifier: logits = sum_{w,c} (L[k, c, w] a_c) r[w, c] + (bias_k + sum_{w,c} L[k, c, w] b_c);
- time is processed in chunks of ``CHUNK_FRAMES`` frames, so patches and partial products
  stay small; only r itself is kept (for backward, in training).

The backward is written by hand (BatchNorm's batch statistics included) and needs one pass
over r for the per-channel sums and one more for the gradients of the convolution and the input.
Its non-GEMM parts run as the native kernels of ``rtsed.backends.native.head`` where available (G^T r;
dL/dz in one pass; the patch-gradient col2im), else as the torch compositions beside them, which
give the same results (tests run both): the head's backward at batch 16 x 1024 on this 2-core
CPU went from 1.2-2.0 s to 0.9-1.2 s (medians, A/B in one process; the range is the machine's
memory-bound day-to-day spread), the train step of dnd_7_10 from 4.7-4.9 s to 4.1 s.
``rtsed.ops`` sends CPU tensors here under RTSED_KERNELS=auto; tests compare it to the reference
composition (values, gradients and running statistics).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rtsed.backends.batchnorm import update_running_stats
from rtsed.backends.dispatch import cpu_gemm_dtype, native_kernels
from rtsed.backends.native import head as native_head

# Patch rows (b, t, w) per chunk: ~6k rows keep a chunk's z (rows x 256) near 6 MB, inside the
# CPU's caches (larger chunks spill and were slower; benchmarks/README.md).
CHUNK_ROWS = 6144


def _chunks(batch: int, frames: int, width: int) -> list[tuple[int, int]]:
    """[t0, t1) frame ranges of about CHUNK_ROWS patch rows each."""
    step = max(1, CHUNK_ROWS // (batch * width))
    return [(t0, min(t0 + step, frames)) for t0 in range(0, frames, step)]


def dilated_patches(x: Tensor, t0: int, t1: int, kernel: int, dilation: int, stride: int, width: int) -> Tensor:
    """x: (B, Tp, C) contiguous time-padded input -> (B * (t1 - t0) * W, K * K) patches of output
    frames [t0, t1), rows ordered (b, t, w), columns (i, j) for tap x[t + i d, w S + j]."""
    b, tp, c = x.shape
    view = x.as_strided((b, t1 - t0, width, kernel, kernel), (tp * c, c, stride, dilation * c, 1),
                        x.storage_offset() + t0 * c)
    return view.reshape(-1, kernel * kernel)


def _scatter_patch_grads(dx: Tensor, d_patches: Tensor, t0: int, t1: int, kernel: int, dilation: int,
                         stride: int, width: int) -> None:
    """The transpose of ``dilated_patches``: adds d_patches (rows, K * K) into dx (B, Tp, C) in place.
    For one tap (i, j) the map (t, w) -> (t + i d, w S + j) is one-to-one, so each tap is one
    strided add without collisions; taps overlap each other and are added in turn."""
    b, tp, c = dx.shape
    grads = d_patches.view(b, t1 - t0, width, kernel, kernel)
    for i in range(kernel):
        for j in range(kernel):
            target = dx.as_strided((b, t1 - t0, width), (tp * c, c, stride),
                                   dx.storage_offset() + (t0 + i * dilation) * c + j)
            target.add_(grads[:, :, :, i, j])


def _pooled_stats(parts: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-column mean and biased variance over the rows of all parts (each (n_i, C)): aten's
    BN-statistics kernel per part (one read; per-part sums of r and r * r were much slower), the
    parts combined in float64 (Chan et al.): var = sum n_i (var_i + (mean_i - mean)^2) / N."""
    counts, means, variances = [], [], []
    for part in parts:
        mean_i, var_i = torch.batch_norm_update_stats(part, None, None, 0.0)
        counts.append(part.shape[0])
        means.append(mean_i)
        variances.append(var_i)
    n = torch.tensor(counts, dtype=torch.float64)[:, None]
    means64, vars64 = torch.stack(means).double(), torch.stack(variances).double()
    mean = (n * means64).sum(0) / n.sum()
    var = (n * (vars64 + (means64 - mean).square())).sum(0) / n.sum()
    dtype = parts[0].dtype
    return mean.to(dtype), var.to(dtype)


class DilatedHeadFunction(torch.autograd.Function):
    """(x, conv, BN, classifier parameters) -> logits (B, T, n_classes); see the module doc.

    x: (B, T + (K - 1) d, C) time-padded CNN output, contiguous. conv_weight (C_out, 1, K, K),
    conv_bias (C_out,), bn_weight/bn_bias (C_out,), lin_weight (n_classes, C_out * W) channel-major
    (index c * W + w, as the reference flattens), lin_bias (n_classes,). running_mean/var are
    updated in place in training (momentum, unbiased variance: as nn.BatchNorm2d does).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # float32 inside CPU autocast
    def forward(ctx, x, conv_weight, conv_bias, bn_weight, bn_bias, lin_weight, lin_bias,
                running_mean, running_var, geometry, training, momentum, eps, gemm_dtype):
        kernel, dilation, stride, width = geometry
        b, tp, _ = x.shape
        t_out = tp - (kernel - 1) * dilation
        c_out = conv_weight.shape[0]
        n_classes = lin_weight.shape[0]
        w_conv_t = conv_weight.reshape(c_out, kernel * kernel).t().contiguous()  # (K K, C_out)
        chunks = _chunks(b, t_out, width)
        # The conv's GEMMs in gemm_dtype (bf16 under CPU autocast: ~1.6x the fp32 rate for these
        # K = 49 shapes here), r and everything after it in x's dtype.
        x_gemm = x if gemm_dtype is None else x.to(gemm_dtype)
        w_gemm, bias_gemm = (w_conv_t, conv_bias) if gemm_dtype is None else \
            (w_conv_t.to(gemm_dtype), conv_bias.to(gemm_dtype))

        # float32/64 GEMMs with the kernels: conv, ReLU and BN's sums in one native pass per chunk
        # (head_conv_relu_stats), replacing a patches copy, the GEMM, a ReLU pass and a statistics
        # pass over r.
        native_conv = gemm_dtype is None and native_kernels(x.dtype)
        conv_taps = native_head.taps_major_conv(conv_weight, conv_bias) if native_conv else None
        sums = []

        def relu_z(t0, t1):  # (B * n * W, C_out)
            if native_conv:
                r = x.new_empty(b * (t1 - t0) * width, c_out)
                sums.append(native_head.head_conv_relu_stats(x, t0, t1, conv_taps, kernel, dilation, stride, width, r))
                return r
            z = torch.addmm(bias_gemm, dilated_patches(x_gemm, t0, t1, kernel, dilation, stride, width), w_gemm)
            return (z if gemm_dtype is None else z.to(x.dtype)).clamp_min_(0)

        keep = any(ctx.needs_input_grad)
        if training:
            r_chunks = [relu_z(t0, t1) for t0, t1 in chunks]
            count = b * t_out * width
            if native_conv:  # float64 sums of r and r^2 over every row
                mean64 = sum(total for total, _ in sums) / count
                var64 = (sum(squares for _, squares in sums) / count - mean64.square()).clamp_min(0)
                mean, var = mean64.to(x.dtype), var64.to(x.dtype)
            else:
                mean, var = _pooled_stats(r_chunks)
            update_running_stats(running_mean, running_var, mean, var, count, momentum)
        else:
            r_chunks = None
            mean, var = running_mean, running_var
        std = torch.sqrt(var + eps)
        scale = bn_weight / std  # a
        shift = bn_bias - mean * scale  # b
        # Classifier weight in (w, c) order, BN folded: (n_classes, W, C_out).
        lin_wc = lin_weight.view(n_classes, c_out, width).transpose(1, 2)
        folded = (lin_wc * scale).reshape(n_classes, width * c_out)
        folded_t = folded.t().contiguous()
        folded_bias = lin_bias + torch.einsum("kwc,c->k", lin_wc, shift)

        logits = x.new_empty(b, t_out, n_classes)
        kept = []
        for index, (t0, t1) in enumerate(chunks):
            r = r_chunks[index] if r_chunks is not None else relu_z(t0, t1)
            if keep:
                kept.append(r)
            logits[:, t0:t1] = torch.addmm(folded_bias, r.view(-1, width * c_out), folded_t).view(b, t1 - t0, -1)

        if keep:
            ctx.save_for_backward(x, conv_weight, bn_weight, lin_weight, mean, std, scale, shift, folded)
            ctx.r_chunks = kept
            ctx.chunks = chunks
            ctx.geometry = geometry
            ctx.x_gemm, ctx.gemm_dtype = x_gemm, gemm_dtype
            ctx.training = training
        return logits

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_logits):
        x, conv_weight, bn_weight, lin_weight, mean, std, scale, shift, folded = ctx.saved_tensors
        kernel, dilation, stride, width = ctx.geometry
        r_chunks, chunks = ctx.r_chunks, ctx.chunks
        b, tp, _ = x.shape
        t_out = tp - (kernel - 1) * dilation
        c_out, n_classes = conv_weight.shape[0], lin_weight.shape[0]
        count = b * t_out * width
        g = grad_logits.contiguous()

        # rtsed.backends.native.head's kernels where available, else the torch compositions beside them.
        fused = native_kernels(x.dtype)
        g_chunks = [g[:, t0:t1].reshape(-1, n_classes).contiguous() for t0, t1 in chunks]  # (B n, k) each

        # Pass 1: G^T r over all frames, the only full pass the classifier and BN gradients need.
        d_lin_bias = g.sum((0, 1))
        g_r = torch.zeros(n_classes, width * c_out, dtype=g.dtype)
        for g_chunk, r in zip(g_chunks, r_chunks):
            if fused:  # a short-and-wide product per chunk, r read from memory: the native pass beats MKL
                native_head.class_products_(g_r, g_chunk, r.view(-1, width * c_out))
            else:
                g_r.addmm_(g_chunk.t(), r.view(-1, width * c_out))
        lin_wc = lin_weight.view(n_classes, c_out, width).transpose(1, 2)  # (k, w, c)
        g_r = g_r.view(n_classes, width, c_out)
        d_lin_weight = (g_r * scale + d_lin_bias[:, None, None] * shift).transpose(1, 2).reshape(n_classes, -1)
        sum_gy = torch.einsum("kwc,k->c", lin_wc, d_lin_bias)  # sum of dL/dy over (b, t, w)
        sum_gy_r = torch.einsum("kwc,kwc->c", lin_wc, g_r)  # sum of dL/dy * r
        d_bn_bias = sum_gy
        d_bn_weight = (sum_gy_r - mean * sum_gy) / std
        # dL/dr = a (gy - mean(gy) - xhat mean(gy xhat)) in training = a gy + alpha + beta r;
        # eval-mode BN is a constant affine: dL/dr = a gy.
        if ctx.training:
            beta_r = -scale * d_bn_weight / (count * std)
            alpha = -scale * d_bn_bias / count - beta_r * mean
            alpha_wc = alpha.repeat(width)  # per (w, c) column of a chunk's (B n, W C_out) gradient
        else:
            alpha = alpha_wc = beta_r = None

        need_x, need_conv_w, need_conv_b = ctx.needs_input_grad[0:3]
        w_conv = conv_weight.reshape(c_out, kernel * kernel)
        x_gemm, gemm_dtype = ctx.x_gemm, ctx.gemm_dtype
        ctx.x_gemm = None
        w_conv_gemm = w_conv if gemm_dtype is None else w_conv.to(gemm_dtype)
        d_x = torch.zeros_like(x) if need_x else None
        d_w_conv = torch.zeros_like(w_conv)
        d_conv_bias = torch.zeros(c_out, dtype=torch.float64 if fused else x.dtype)  # the kernels sum in float64
        # With the kernels and float32/64 GEMMs, one native pass per chunk does dL/dz and both of
        # the conv's gradient GEMMs (head_conv_backward); with bf16 GEMMs (CPU autocast) dL/dz is
        # native and the GEMMs run in bf16.
        one_pass = fused and gemm_dtype is None and kernel in native_head.CONV_KERNELS
        if one_pass:
            w_conv_padded = native_head.padded_conv_weight(conv_weight)
            d_patches_buffer = x.new_empty(max((r.shape[0] for r in r_chunks), default=0), kernel * kernel)
        if fused:
            folded_w = folded.view(n_classes, width, c_out).transpose(0, 1).contiguous()  # (W, k, C_out)
            # One dz buffer for all chunks, in cache between the pass that writes it and the GEMMs
            # that read it (as fast as writing over r, which would change what ctx saved).
            dz_buffer = x.new_empty(max((r.shape[0] for r in r_chunks), default=0), c_out)
        for (t0, t1), g_chunk, r in zip(chunks, g_chunks, r_chunks):
            if one_pass:
                d_patches = d_patches_buffer[:r.shape[0]]
                d_conv_bias += native_head.head_conv_backward(x, t0, t1, r, g_chunk, folded_w, alpha, beta_r,
                                                              w_conv_padded, kernel, dilation, stride, d_patches,
                                                              d_w_conv)
                if need_x:
                    native_head.patch_scatter_(d_x, d_patches, t0, t1, kernel, dilation, stride, width)
                continue
            # Pass 2: a * gy for this chunk, (rows, C_out), straight from the folded classifier.
            if fused:  # one pass (the torch composition below makes four), its channel sums beside
                dz, dz_sum = native_head.head_relu_grad(r, g_chunk, folded_w, alpha, beta_r,
                                                        out=dz_buffer[:r.shape[0]])
                d_conv_bias += dz_sum
            else:
                if alpha_wc is None:
                    dz = (g_chunk @ folded).view(-1, c_out)
                else:  # a gy + alpha + beta r, in place on the GEMM's output
                    dz = torch.addmm(alpha_wc, g_chunk, folded).view(-1, c_out).addcmul_(r, beta_r)
                # ReLU's gradient mask; threshold_backward is one fused pass (a bool mask and a
                # multiply by it cost 9x as much: a comparison kernel, then a bool -> float copy).
                dz = torch.ops.aten.threshold_backward(dz, r, 0.0)
                if need_conv_b:
                    d_conv_bias += dz.sum(0)
            patches = dilated_patches(x_gemm, t0, t1, kernel, dilation, stride, width)
            dz_gemm = dz if gemm_dtype is None else dz.to(gemm_dtype)
            if need_conv_w:
                if gemm_dtype is None:
                    d_w_conv.addmm_(dz.t(), patches)
                else:
                    d_w_conv += dz_gemm.t() @ patches
            if need_x:
                d_patches = (dz_gemm @ w_conv_gemm).to(x.dtype)
                if fused:
                    native_head.patch_scatter_(d_x, d_patches, t0, t1, kernel, dilation, stride, width)
                else:
                    _scatter_patch_grads(d_x, d_patches, t0, t1, kernel, dilation, stride, width)
        d_conv_bias = d_conv_bias.to(x.dtype)
        ctx.r_chunks = None
        return (d_x, d_w_conv.view_as(conv_weight), d_conv_bias, d_bn_weight, d_bn_bias,
                d_lin_weight, d_lin_bias, None, None, None, None, None, None, None)


def padded_frames(h: Tensor, left: int, right: int) -> Tensor:
    """h: (B, C, T, 1) -> f_dil's input frames (B, left + T + right, C), time zero-padded, contiguous."""
    x = h[..., 0].transpose(1, 2)  # (B, T, C)
    return torch.nn.functional.pad(x, (0, 0, left, right)).contiguous()


def dilated_head(h: Tensor, conv_weight: Tensor, conv_bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                 bn_running_mean: Tensor | None, bn_running_var: Tensor | None, lin_weight: Tensor, lin_bias: Tensor,
                 *, dilation: int, stride: int, right_pad: int, training: bool, momentum: float, eps: float) -> Tensor:
    """h: (B, C, T, 1) CNN output -> logits (B, T, n_classes), equal to rtsed.ops.dilated_head_ref
    on the same tensors (f_dil's conv, ReLU, BN as ``F.batch_norm`` takes it, the classifier),
    through ``DilatedHeadFunction`` (training, or eval with autograd)."""
    kernel = conv_weight.shape[2]
    context = (kernel - 1) * dilation
    x = padded_frames(h, context - right_pad, right_pad)
    geometry = (kernel, dilation, stride, (h.shape[1] - kernel) // stride + 1)
    return DilatedHeadFunction.apply(
        x, conv_weight, conv_bias, bn_weight, bn_bias, lin_weight, lin_bias, bn_running_mean, bn_running_var,
        geometry, training, momentum, eps, cpu_gemm_dtype(x))
