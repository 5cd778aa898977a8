"""rtsed.ops.block: the CNN blocks' ops (``conv_block`` for f_cnn, ``dws_block`` for f_dws) as
functions of tensors, against their stock-torch ``_ref`` twins.

- Each op, as the layer calls it (whatever dispatch picks on this machine: native or cpu-folded
  in eval, cpu-train for DWS blocks in training), equals its twin in float64 to ~1e-10, in
  training (output, running statistics, num_batches_tracked, Dropout2d's draws, gradients) and
  in eval, for "same" and "causal" padding, one-input-channel and many-channel blocks.
- The streaming step (``<op>_step``) over steps of 1, 3, 4 and 7 frames equals the twin offline,
  and so does the step's twin; both leave the history holding the input's last K - 1 frames.
- The twins equal the stock nn modules composed in the paper's order, training and eval.
- A block whose modules no longer have the structure its op computes is refused, as are
  BatchNorms left in another mode than the block's.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rtsed import ops
from rtsed.backends import dispatch
from rtsed.backends.dispatch import CPU_TRAIN, FOLDED, NATIVE
from rtsed.models.layers import ConvBlock, DWSBlock, fold_cache

TOL = dict(rtol=1e-10, atol=1e-11)  # float64: the fast paths only reorder the arithmetic
KINDS = {"cnn": ConvBlock, "dws": DWSBlock}
KERNEL, POOL, FREQ, CHANNELS = 5, 3, 14, 8  # F mod P = 2: the pool drops two frequencies


def _block(kind: str, c_in: int, padding: str, dropout: float = 0.0) -> nn.Module:
    """A float64 block with random weights, running statistics and BN scales of both signs."""
    torch.manual_seed(c_in * 10 + len(kind))
    right_pad = KERNEL // 2 if padding == "same" else 0
    block = KINDS[kind](c_in, CHANNELS, KERNEL, POOL, dropout, right_pad=right_pad).double()
    with torch.no_grad():
        for bn in block.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(-1.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
    return block


def _reference(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's op twin on the block's tensors, x time-padded as ``forward`` pads it."""
    x = F.pad(x, (0, 0, block.context_frames - block.right_pad, block.right_pad))
    if isinstance(block, DWSBlock):
        args, kwargs = block.dws_arguments()
        return ops.dws_block_ref(x, *args, **kwargs)
    args, kwargs = block.conv_arguments()
    return ops.conv_block_ref(x, *args, **kwargs)


def _choice(block: nn.Module, x: torch.Tensor) -> str:
    """What dispatch picks for the block's op on the time-padded x."""
    return dispatch.frequency_block(x, isinstance(block, DWSBlock), block.training, block.kernel,
                                    block.out_channels, block.pool_size, *block.parameters())


@pytest.mark.parametrize("kind", ["cnn", "dws"])
@pytest.mark.parametrize("c_in", [1, CHANNELS])
@pytest.mark.parametrize("padding", ["same", "causal"])
def test_op_equals_its_twin_in_training(kind, c_in, padding):
    """Output, input and parameter gradients, running statistics, num_batches_tracked, and
    Dropout2d's draws (one seed on both sides)."""
    block = _block(kind, c_in, padding, dropout=0.5).train()
    twin = copy.deepcopy(block)
    x = torch.randn(3, c_in, 12, FREQ, dtype=torch.float64)
    if kind == "dws" and dispatch.native_kernels(x.dtype):
        assert _choice(block, F.pad(x, (0, 0, KERNEL - 1, 0))) == CPU_TRAIN
    outputs = []
    for b in (block, twin):
        x_in = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        out = b(x_in) if b is block else _reference(b, x_in)
        torch.manual_seed(8)  # (randn, not randn_like: the fast paths' outputs are channels-last)
        (out * torch.randn(out.shape, dtype=out.dtype)).sum().backward()
        outputs.append((out.detach(), x_in.grad))
    (out, dx), (out_ref, dx_ref) = outputs
    assert out.shape == (3, CHANNELS, 12, FREQ // POOL)
    assert (out_ref == 0).any(), "dropout dropped nothing: the draws were not compared"
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-9, atol=1e-10)
    for (name, p), p_ref in zip(block.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-10, msg=name)
    for (name, buf), buf_ref in zip(block.named_buffers(), twin.buffers()):
        torch.testing.assert_close(buf, buf_ref, **TOL, msg=name)  # num_batches_tracked included


@pytest.mark.parametrize("kind", ["cnn", "dws"])
@pytest.mark.parametrize("c_in", [1, CHANNELS])
@pytest.mark.parametrize("padding", ["same", "causal"])
def test_op_equals_its_twin_in_eval(kind, c_in, padding):
    block = _block(kind, c_in, padding, dropout=0.5).eval()
    x = torch.randn(2, c_in, 9, FREQ, dtype=torch.float64)
    with torch.no_grad():
        choice = _choice(block, F.pad(x, (0, 0, KERNEL - 1, 0)))
        assert choice in (NATIVE, FOLDED)  # a fast path, not the reference itself
        out = block(x)
        torch.testing.assert_close(out, _reference(block, x), **TOL)
        torch.testing.assert_close(block(x), out, rtol=0, atol=0)  # the second call on cached folds


@pytest.mark.parametrize("kind", ["cnn", "dws"])
@pytest.mark.parametrize("c_in", [1, CHANNELS])
@pytest.mark.parametrize("padding", ["same", "causal"])
def test_streaming_step_equals_the_twin_offline(kind, c_in, padding):
    """Steps through the layer (the op's step) and through the step's twin, each from a zero
    history, equal the twin on the whole input with K - 1 zero frames before it: the output for
    input frame t is offline frame t - right_pad."""
    block = _block(kind, c_in, padding).eval()
    x = torch.randn(2, c_in, 15, FREQ, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    state = block.init_state(2, FREQ, x.device, x.dtype)
    history_ref = torch.zeros(2, c_in, KERNEL - 1, FREQ, dtype=torch.float64)
    step_ref = ops.dws_block_step_ref if kind == "dws" else ops.conv_block_step_ref
    arguments = block.dws_arguments if kind == "dws" else block.conv_arguments
    with torch.no_grad():
        streamed, streamed_ref, t = [], [], 0
        for n in (1, 3, 4, 7):
            streamed.append(block.step(x[:, :, t:t + n], state))
            args, kwargs = arguments()
            streamed_ref.append(step_ref(x[:, :, t:t + n], history_ref, *args, **kwargs))
            t += n
        args, kwargs = arguments()
        offline_ref = (ops.dws_block_ref if kind == "dws" else ops.conv_block_ref)(
            torch.cat([torch.zeros_like(history_ref), x], dim=2), *args, **kwargs)
    torch.testing.assert_close(torch.cat(streamed, dim=2), offline_ref, **TOL)
    torch.testing.assert_close(torch.cat(streamed_ref, dim=2), offline_ref, **TOL)
    assert torch.equal(state.frames, x[:, :, -(KERNEL - 1):])
    assert torch.equal(history_ref, x[:, :, -(KERNEL - 1):])


def _modules_composed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block as its stock nn modules, in the paper's order (docs/reference.md)."""
    x = F.pad(x, (0, 0, block.context_frames - block.right_pad, block.right_pad))
    if isinstance(block, DWSBlock):
        y = block.pointwise(block.inner_bn(F.leaky_relu(block.depthwise(x), 0.01)))
    else:
        y = block.conv(x)
    return block.dropout(block.pool(block.bn(F.relu(y))))


@pytest.mark.parametrize("kind", ["cnn", "dws"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_twin_equals_the_modules(kind, training):
    block = _block(kind, CHANNELS, "same", dropout=0.5).train(training)
    modules = copy.deepcopy(block)
    x = torch.randn(2, CHANNELS, 10, FREQ, dtype=torch.float64)
    torch.manual_seed(3)
    out = _reference(block, x)
    torch.manual_seed(3)
    expected = _modules_composed(modules, x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for (name, buf), buf_ref in zip(block.named_buffers(), modules.buffers()):
        torch.testing.assert_close(buf, buf_ref, rtol=1e-12, atol=1e-12, msg=name)


def test_folds_follow_the_parameters():
    """The eval folds are cached in the layer's dict (rtsed.ops.fold) and refolded when a
    parameter or running statistic changes in place."""
    for kind in ("cnn", "dws"):
        block = _block(kind, CHANNELS, "causal").eval()
        x = torch.randn(1, CHANNELS, 6, FREQ, dtype=torch.float64)
        with torch.no_grad():
            block(x)
            assert fold_cache(block), "nothing was cached"
            block.bn.running_var.mul_(3.0)
            block.bn.weight.neg_()
            torch.testing.assert_close(block(x), _reference(block, x), **TOL)


def test_a_changed_structure_is_refused():
    """The ops compute the structure the layer builds; a module changed before the block's first
    call would silently run as built, so the block refuses it."""
    block = DWSBlock(4, 4, 5, 2, 0.0, right_pad=2)
    block.depthwise.padding_mode = "reflect"
    with pytest.raises(ValueError, match="unsupported conv"):
        block(torch.randn(1, 4, 6, 8))
    block = ConvBlock(1, 4, 5, 2, 0.0, right_pad=2)
    block.pool.ceil_mode = True
    with pytest.raises(ValueError, match="unsupported pool"):
        block(torch.randn(1, 1, 6, 8))


def test_batchnorms_in_another_mode_than_the_block_are_refused():
    block = DWSBlock(4, 4, 5, 2, 0.0, right_pad=2).train()
    block.inner_bn.eval()
    tracked = block.bn.num_batches_tracked.clone()
    with pytest.raises(ValueError, match="train/eval mode"):
        block(torch.randn(1, 4, 6, 8))
    assert torch.equal(block.bn.num_batches_tracked, tracked)  # refused before any bookkeeping
