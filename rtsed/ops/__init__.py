"""The ops the model's layers call: each picks its implementation through
rtsed.backends.dispatch and runs it (the reference composition, a CPU fast path, or a Triton
kernel from kernels/). Model code calls ``ops.<op>(layer, x)`` and never imports triton.

Each op with a kernel lives in ``kernels/<op>.py`` and exposes ``<op>_layer(layer, ...)`` with
the signature of the function here (an autograd-aware launcher). An op whose kernel module does
not exist yet resolves to ``ref`` under ``auto`` and is an error under ``triton``.
"""

from __future__ import annotations

import importlib

from torch import Tensor

from rtsed.backends import cpu_block, cpu_head
from rtsed.backends.dispatch import backend_for, cpu_fast_path, eval_fast_path


def _kernel(op: str):
    """The launcher ``kernels.<op>.<op>_layer`` (imported only when dispatched to)."""
    module = importlib.import_module(f"kernels.{op}")
    return getattr(module, f"{op}_layer")


def frequency_block(block: "FrequencyBlock", x: Tensor) -> Tensor:
    """A whole CNN block (f_cnn or f_dws) on time-padded input: the fused DWS kernel where
    Triton runs; on CPU the folded eval composition in eval mode and, for DWS blocks in training,
    rtsed.backends.cpu_block (native fused passes; the reference when they cannot be built); the
    reference otherwise.
    x: (B, C_in, T + K - 1, F) -> (B, C_out, T, F // P)."""
    if block.separable:
        if backend_for("dws_block", x) == "triton":
            return _kernel("dws_block")(block, x)
    if eval_fast_path(block, x):
        return block.folded_valid_time(x)
    if block.separable and block.training and cpu_fast_path(x):
        if cpu_block.applies(block, x):
            return cpu_block.dws_block_train(block, x)
    return block.post(block.conv_valid_time(x))


def dilated_temporal(layer: "DilatedTemporal", x: Tensor) -> Tensor:
    """f_dil's dilated conv -> ReLU -> BN on time-padded input.
    x: (B, 1, T + (K - 1) d, C) -> (B, C_out, T, W)."""
    if backend_for("dilated_temporal", x) == "triton":
        return _kernel("dilated_temporal")(layer, x)
    return layer.conv_relu_bn(x)


def dilated_step(layer: "DilatedTemporal", frames: Tensor, state: "FrameRing") -> Tensor:
    """One streaming step of f_dil over its ring buffer: writes frames (B, n, C) into the ring
    at state.write_pos, advances it, and returns (B, n, C_out * W) for the new frames."""
    if backend_for("dilated_step", frames) == "triton":
        return _kernel("dilated_step")(layer, frames, state)
    return layer.step_slice_ref(frames, state)


def dilated_head(layer: "DilatedTemporal", classifier: "nn.Linear", h: Tensor) -> Tensor:
    """f_dil -> ReLU -> BN -> per-frame classifier: h (B, C, T, 1) CNN output -> logits
    (B, T, n_classes). The CPU fast path (rtsed.backends.cpu_head) folds BN into the classifier and works
    in time chunks; elsewhere f_dil goes through ``dilated_temporal`` (Triton on CUDA) and the
    classifier is applied to its output."""
    if cpu_fast_path(h):
        return cpu_head.dilated_head(layer, classifier, h)
    return classifier(layer(h))


def dilated_step_logits(layer: "DilatedTemporal", classifier: "nn.Linear", h: Tensor,
                        state: "FrameRing") -> Tensor:
    """A streaming step of f_dil and the classifier: h (B, C, n, 1) new CNN frames -> logits
    (B, n, n_classes). On CPU in eval mode BN is folded into the classifier (one conv, ReLU and
    one GEMM per step); elsewhere ``dilated_step`` (Triton on CUDA) then the classifier."""
    if backend_for("dilated_step", h) != "triton" and eval_fast_path(layer, h):
        return layer.step_logits_folded(h, state, classifier)
    return classifier(layer.step(h, state))
