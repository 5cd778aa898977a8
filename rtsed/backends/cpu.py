"""CPU arithmetic helpers shared by the models' eval paths and the CPU training fast paths:
oneDNN GEMMs with fused activations, bf16 operand copies, channels-last convolutions and the
patch matrix of a one-channel convolution. Same values as the plain torch calls they replace.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from rtsed.backends import dispatch


def conv2d_like_input(x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int], groups: int = 1,
                      channels_last_weight: Tensor | None = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding, groups=groups)`` (stride and dilation 1) with
    the weight in x's memory format. oneDNN picks its layout from input and weight together; a
    one-input-channel weight (256, 1, 5, 5) reads as NCHW unless restrided, and then a
    channels-last input runs the whole conv in NCHW (docs/fast-paths.md). Same values either way.
    ``channels_last_weight``: the weight already restrided (cached by the caller), else restrided
    here."""
    if dispatch.channels_last(x):
        weight = channels_last_weight if channels_last_weight is not None else \
            weight.to(memory_format=torch.channels_last)
    return F.conv2d(x, weight, bias, 1, padding, 1, groups)


def _relu_owned(x: Tensor) -> Tensor:
    """ReLU of a fresh tensor the caller owns: in place, unless autograd records it (amax and
    max-pool save their output for backward, which an in-place ReLU would overwrite)."""
    return F.relu(x) if x.requires_grad else x.relu_()


def _mkldnn_linear():
    """torch's oneDNN linear with a fused post-op (what inductor uses on CPU), or None."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):  # a torch build without it
        return None


_MKLDNN_LINEAR = _mkldnn_linear()


def has_onednn_linear() -> bool:
    """Whether this torch has the oneDNN linear ``fused_linear`` uses."""
    return _MKLDNN_LINEAR is not None


def fused_linear(x: Tensor, weight: Tensor, bias: Tensor, activation: str = "none") -> Tensor:
    """Eval-mode ``act(x @ weight.T + bias)``: x (M, K), weight (N, K), bias (N,) -> (M, N), with
    activation "none", "relu" or "leaky_relu" (slope 0.01). On the CPU in fp32 without autograd,
    from 4M multiply-accumulates up, it is one oneDNN matmul with the activation fused (torch's
    mkldnn linear-pointwise op, which has no backward): faster than MKL's addmm on the streaming
    GEMMs, and it saves the activation's pass over the output; below that size its fixed cost per
    call loses. Elsewhere addmm, then the activation.
    Which of the three runs is ``dispatch.gemm``'s choice."""
    how = dispatch.gemm(x, weight, bias, _MKLDNN_LINEAR is not None)
    if how != "addmm":
        scalars = [0.01] if activation == "leaky_relu" else []
        if how == "onednn-bf16":
            # Inference at --precision bf16: bf16 operands, float32 accumulation, float32 out.
            weight_bf16, bias_bf16 = _bf16_operands(weight, bias)
            return _MKLDNN_LINEAR(x.to(torch.bfloat16), weight_bf16, bias_bf16, activation, scalars, "").float()
        return _MKLDNN_LINEAR(x, weight, bias, activation, scalars, "")
    with torch.autocast("cpu", enabled=False):  # (small GEMMs stay in x's dtype under --precision bf16)
        out = torch.addmm(bias, x, weight.t())
    if activation == "relu":
        return F.relu(out) if out.requires_grad else out.clamp_min_(0)
    if activation == "leaky_relu":
        return F.leaky_relu(out, 0.01) if out.requires_grad else F.leaky_relu_(out, 0.01)
    return out


_bf16_copies: dict[int, tuple] = {}  # id(weight) -> (weakref to it, its version, bf16 weight, bf16 bias)


def _version(t: Tensor) -> int:
    """t's in-place version counter; -1 for an inference tensor (made under torch.inference_mode,
    which keeps none: the folds computed there are never changed in place, only recomputed)."""
    return -1 if t.is_inference() else t._version


def _bf16_operands(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """bf16 copies of a GEMM's weight and bias, made once per weight while it is unchanged (the
    callers pass cached folded weights; converting a 256 x 256 weight per streaming step cost
    more than the bf16 GEMM saved)."""
    versions = (_version(weight), _version(bias))
    hit = _bf16_copies.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == versions and hit[4] is bias:
        return hit[2], hit[3]
    ref = weakref.ref(weight, lambda _, key=id(weight): _bf16_copies.pop(key, None))
    copies = (ref, versions, weight.to(torch.bfloat16), bias.to(torch.bfloat16), bias)
    _bf16_copies[id(weight)] = copies
    return copies[2], copies[3]


def one_channel_patches(x: Tensor, kernel: int) -> Tensor:
    """x: (B, 1, T + K - 1, F) time-padded -> (B * T * F, K * K) patches of a K x K conv with
    frequency zero-padded by K // 2, rows ordered (b, t, f), columns (i, j) as a (C, 1, K, K)
    weight flattens."""
    xp = F.pad(x[:, 0], (kernel // 2, kernel // 2)).contiguous()  # (B, T + K - 1, F + K - 1)
    b, t_in, f_pad = xp.shape
    t, f = t_in - kernel + 1, f_pad - kernel + 1
    view = xp.as_strided((b, t, f, kernel, kernel), (t_in * f_pad, f_pad, 1, f_pad, 1))
    return view.reshape(-1, kernel * kernel)
