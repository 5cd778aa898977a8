"""The ops the model's layers call: each picks its implementation through
rtsed.backends.dispatch, once per call, and runs it (the reference composition, a CPU fast path,
or a Triton kernel from kernels/). Model code never imports triton.

Every op is a function of tensors (input, weights, BatchNorm affine and statistics, state) and
plain numbers, returning tensors, with its stock-torch ``<op>_ref`` twin beside it; the layers
call the ops with their own parameters and an op never calls back into a layer
(tests/test_architecture.py checks it). Eval-mode folds are cached in a dict the layer hands
over (rtsed.ops.fold).

- rtsed.ops.block: the CNN's frequency blocks, ``conv_block`` (f_cnn) and ``dws_block`` (f_dws),
  offline and as streaming steps (``<op>_step``); their folded eval arithmetic is
  rtsed.ops.folded_block.
- rtsed.ops.dilated: f_dil, ``dilated_temporal`` and ``dilated_step``, and the ring readers.
- rtsed.ops.head: f_dil and the classifier as one op, ``dilated_head`` and ``dilated_step_logits``.

A Triton op's launcher is ``kernels.<op>.<op>``, taking the op's tensors (rtsed.ops.launch).
"""

from __future__ import annotations

from rtsed.ops.block import (conv_block, conv_block_ref, conv_block_step, conv_block_step_ref, dws_block,
                             dws_block_ref, dws_block_step, dws_block_step_ref)
from rtsed.ops.dilated import (dilated_step, dilated_step_ref, dilated_temporal, dilated_temporal_ref, ring_taps,
                               ring_window)
from rtsed.ops.fold import bn_affine, cached_fold
from rtsed.ops.head import dilated_head, dilated_head_ref, dilated_step_logits, dilated_step_logits_ref, folded_classifier

__all__ = ["bn_affine", "cached_fold", "conv_block", "conv_block_ref", "conv_block_step", "conv_block_step_ref",
           "dilated_head", "dilated_head_ref", "dilated_step", "dilated_step_logits", "dilated_step_logits_ref",
           "dilated_step_ref", "dilated_temporal", "dilated_temporal_ref", "dws_block", "dws_block_ref",
           "dws_block_step", "dws_block_step_ref", "folded_classifier", "ring_taps", "ring_window"]
