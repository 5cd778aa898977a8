"""The ops the model's layers call: each picks its implementation through
rtsed.backends.dispatch, once per call, and runs it (the reference composition, a CPU fast path,
or a Triton kernel from kernels/). Model code never imports triton.

The target shape of every op (issue 16): a function of tensors (input, weights, BatchNorm affine
and statistics, state) and plain numbers, returning tensors, with its stock-torch ``<op>_ref``
twin beside it; the layers call the ops with their own parameters and an op never calls back
into a layer. f_dil's ops are so (rtsed.ops.dilated: ``dilated_temporal``, ``dilated_step``, the
ring readers; rtsed.ops.head: ``dilated_head``, ``dilated_step_logits``, each with its
``_ref`` twin; eval-mode folds cached in a dict the layer hands over, rtsed.ops.fold); the CNN
block's ops below still take the block (tests/test_architecture.py lists them in
NOT_YET_FUNCTIONAL), though its training paths (the Triton launcher, rtsed.backends.cpu_block)
run on the tensors the block hands over (``DWSBlock.dws_arguments``). A Triton op's launcher is ``kernels.<op>.<op>``, with the op's tensor
signature (rtsed.ops.launch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rtsed.backends import cpu_block, cpu_eval, dispatch
from rtsed.backends.dispatch import CPU_TRAIN, FOLDED, FOLDED_EXPORT, NATIVE, TRITON
from rtsed.ops.dilated import (dilated_step, dilated_step_ref, dilated_temporal, dilated_temporal_ref, ring_taps,
                               ring_window)
from rtsed.ops.head import (dilated_head, dilated_head_ref, dilated_step_logits, dilated_step_logits_ref,
                                    folded_classifier)
from rtsed.ops.fold import bn_affine, cached_fold
from rtsed.ops.launch import launcher


def frequency_block(block: "FrequencyBlock", x: Tensor) -> Tensor:
    """A whole CNN block (f_cnn or f_dws) on time-padded input.
    x: (B, C_in, T + K - 1, F) -> (B, C_out, T, F // P)."""
    return _frequency_block(block, x, dispatch.frequency_block(block, x))


def _frequency_block(block: "FrequencyBlock", x: Tensor, how: str) -> Tensor:
    if how == NATIVE:
        return cpu_eval.dws_block(x, block.eval_operands(), block.kernel, block.pool.kernel_size[1])
    if how == FOLDED:
        return block.folded_valid_time(x)
    if how == FOLDED_EXPORT:
        return block.folded_valid_time(x, export=True)
    if how in (CPU_TRAIN, TRITON):
        args, kwargs = block.dws_arguments()
        op = cpu_block.dws_block_train if how == CPU_TRAIN else launcher("dws_block")
        out = op(x, *args, **kwargs)
        return F.dropout2d(out, block.dropout.p, block.dropout.training)  # nn.Dropout2d's call: the same draws
    return block.post(block.conv_valid_time(x))


def frequency_block_step(block: "FrequencyBlock", x: Tensor, history: Tensor) -> Tensor:
    """A streaming step of a CNN block: x (B, C_in, n, F) new frames, history (B, C_in, K - 1, F)
    the frames before them -> (B, C_out, n, F // P); history advances in place to the last
    K - 1 frames. The native kernels read history and x where they lie; the others run
    ``frequency_block`` on their concatenation."""
    how = dispatch.frequency_block(block, x)  # (the window has x's device, dtype and autograd)
    if how == NATIVE:
        return cpu_eval.dws_block(x, block.eval_operands(), block.kernel, block.pool.kernel_size[1], history,
                                  advance_history=True)
    window = torch.cat([history, x], dim=2)
    if block.context_frames:
        history.copy_(window[:, :, window.shape[2] - block.context_frames:])
    return _frequency_block(block, window, how)
