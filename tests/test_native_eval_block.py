"""rtsed.backends.native.eval_block (the eval-mode CNN block kernels) against plain torch.

- Each wrapper against its torch formula: float64 to ~1e-12, float32 at the parity rule; sizes
  that leave partial register tiles (frequency tiles of 8 / 4 / 2 / 1 positions, channels past
  the last full vector, channels all in the scalar tail), K = 3 / 5 / 7, one input channel and
  depthwise, a streaming history read in place or none; BN scales of both signs and zero; the
  same bits at 1 and 2 threads.
- DWSBlock in eval mode through the kernels against its op's stock-torch twin
  (``valid_time_ref``) and against the torch fast path (RTSED_NATIVE=0), offline and as a
  streaming step, and the cases that must fall back (autograd recording, RTSED_NATIVE=0, tracing).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rtsed.backends import dispatch
from rtsed.models.layers import ConvHistory, DWSBlock
from rtsed.models.model import build_model
from rtsed.backends.native import eval_block

ATOL, RTOL = 1e-5, 1e-4  # the parity rule of docs/streaming.md (fp32)


def _tol(dtype):
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": RTOL, "atol": ATOL}


def _conv_reference(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: float) -> torch.Tensor:
    """window (B, T + K - 1, F, Cx) channels-last rows, weight (C, 1, K, K) -> (B, T, F, C)."""
    k = weight.shape[-1]
    nchw = window.permute(0, 3, 1, 2)
    groups = nchw.shape[1]  # C (depthwise) or 1 (one input channel, depth multiplier C)
    y = F.conv2d(nchw, weight, bias, padding=(0, k // 2), groups=groups)
    return F.leaky_relu(y, slope).permute(0, 2, 3, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("one_input", [True, False], ids=["1->C", "depthwise"])
@pytest.mark.parametrize("kernel,history,frames,freq,channels", [
    (5, 4, 16, 40, 256),  # dnd block 1 / streaming: 5 frequency tiles of 8, full vectors
    (5, 4, 16, 8, 256),  # dnd block 2
    (5, 4, 16, 2, 256),  # dnd block 3: every position at both frequency edges
    (5, 0, 9, 15, 37),  # no history; tiles 8 + 4 + 2 + 1; channels past the last vector
    (3, 2, 1, 7, 19),  # one new frame, fewer frames than the history
    (7, 0, 12, 3, 5),  # channels all in the scalar tail; F < K
    (3, 0, 3, 1, 40),  # F = 1: only the centre column of the taps
])
def test_depthwise_conv_leaky_matches_torch(native_on, dtype, one_input, kernel, history, frames, freq, channels):
    g = torch.Generator().manual_seed(kernel * 100 + freq)
    cx = 1 if one_input else channels
    batch = 2
    new = torch.randn(batch, frames, freq, cx, generator=g, dtype=dtype)
    past = torch.randn(batch, history, freq, cx, generator=g, dtype=dtype) if history else None
    weight = torch.randn(channels, 1, kernel, kernel, generator=g, dtype=dtype)
    bias = torch.randn(channels, generator=g, dtype=dtype)
    taps = weight.reshape(channels, -1).t().contiguous()
    window = new if past is None else torch.cat([past, new], dim=1)
    out = eval_block.depthwise_conv_leaky(new, taps, bias, kernel, 0.01, past)
    if past is not None:
        assert torch.equal(past, window[:, :history])  # read, not advanced
        advanced = eval_block.depthwise_conv_leaky(new, taps, bias, kernel, 0.01, past, advance_history=True)
        assert torch.equal(advanced, out)
        assert torch.equal(past, window[:, -history:])  # the window's last H frames (N < H too)
    expected = _conv_reference(window, weight, bias, 0.01)
    assert out.shape == expected.shape == (batch, history + frames - kernel + 1, freq, channels)
    torch.testing.assert_close(out, expected, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("signs", ["nonnegative", "mixed"])
@pytest.mark.parametrize("outer,freq,channels,pool", [
    (16, 40, 256, 5),  # dnd block 1
    (16, 8, 256, 4),  # dnd block 2
    (16, 2, 256, 2),  # dnd block 3
    (7, 11, 37, 3),  # F mod P = 2 bins dropped; channels past the last vector
    (3, 5, 6, 1),  # no pooling; channels all in the scalar tail
])
def test_pool_relu_affine_matches_torch(native_on, dtype, signs, outer, freq, channels, pool):
    g = torch.Generator().manual_seed(freq * 10 + pool)
    y = torch.randn(outer, freq, channels, generator=g, dtype=dtype)
    scale = torch.rand(channels, generator=g, dtype=dtype) + 0.1
    if signs == "mixed":
        scale[::3] *= -1
        scale[1::5] = 0
    shift = torch.randn(channels, generator=g, dtype=dtype)
    out = eval_block.pool_relu_affine(y, pool, torch.sign(scale), scale.abs(), shift)
    # The unfolded order: ReLU -> BN affine -> max-pool over frequency.
    bn = torch.relu(y) * scale + shift
    groups = freq // pool
    expected = bn[:, :groups * pool].unflatten(1, (groups, pool)).amax(2)
    assert out.shape == (outer, groups, channels)
    torch.testing.assert_close(out, expected, **_tol(dtype))


def test_kernels_give_the_same_bits_at_any_thread_count(native_on, threads):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 21, 8, 256, generator=g)
    taps, bias = torch.randn(25, 256, generator=g), torch.randn(256, generator=g)
    y = torch.randn(48, 40, 256, generator=g)
    sign, magnitude, shift = torch.ones(256), torch.rand(256, generator=g), torch.randn(256, generator=g)
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        results.append((eval_block.depthwise_conv_leaky(x, taps, bias, 5, 0.01),
                        eval_block.pool_relu_affine(y, 5, sign, magnitude, shift)))
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_wrappers_reject_what_the_kernels_cannot_run(native_on):
    x = torch.randn(1, 6, 8, 16)
    with pytest.raises(ValueError, match="kernel 4"):
        eval_block.depthwise_conv_leaky(x, torch.randn(16, 16), torch.randn(16), 4, 0.01)
    with pytest.raises(ValueError, match="do not fit"):
        eval_block.depthwise_conv_leaky(x, torch.randn(25, 8), torch.randn(8), 5, 0.01)
    with pytest.raises(ValueError, match="history"):
        eval_block.depthwise_conv_leaky(x, torch.randn(25, 16), torch.randn(16), 5, 0.01, torch.randn(1, 4, 7, 16))
    with pytest.raises(ValueError, match="contiguous"):
        eval_block.depthwise_conv_leaky(x.transpose(1, 2), torch.randn(25, 16), torch.randn(16), 5, 0.01)
    with pytest.raises(TypeError, match="float32 or float64"):
        eval_block.pool_relu_affine(torch.randn(2, 4, 3).half(), 2, *torch.ones(3, 3).half())


# --- DWSBlock through the kernels ----------------------------------------------------------------


def _eval_block(c_in: int, c_out: int, pool: int, dtype, negative_scales: bool) -> DWSBlock:
    """A DWSBlock in eval mode with random weights and running statistics, the output BN's
    scales of one sign or of both (some exactly zero)."""
    torch.manual_seed(c_in * 7 + pool)
    block = DWSBlock(c_in, c_out, 5, pool, 0.0, right_pad=2).to(dtype).eval()
    with torch.no_grad():
        for bn in (block.inner_bn, block.bn):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.2, 1.5)
            bn.bias.normal_()
        if negative_scales:
            block.bn.weight[::3] *= -1
            block.bn.weight[1::7] = 0
    return block


def _native_applies(block: DWSBlock, x: torch.Tensor) -> bool:
    """dispatch's native check on the block's facts, as rtsed.ops.block asks it."""
    return dispatch.native_block_applies(x, block.kernel, block.out_channels, block.depthwise.weight,
                                         block.pointwise.weight)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("negative_scales", [False, True], ids=["a>=0", "signed"])
@pytest.mark.parametrize("c_in,c_out,freq,pool", [(1, 37, 40, 5), (24, 24, 8, 4), (256, 256, 2, 2), (19, 19, 11, 3)])
def test_block_matches_reference_and_torch_path(native_on, monkeypatch, dtype, negative_scales, c_in, c_out, freq,
                                                pool):
    block = _eval_block(c_in, c_out, pool, dtype, negative_scales)
    x = _channels_last(torch.randn(2, c_in, 13, freq, dtype=dtype))
    calls = []
    real = eval_block.depthwise_conv_leaky
    monkeypatch.setattr(eval_block, "depthwise_conv_leaky", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        assert _native_applies(block, x)
        out = block.valid_time(x)
        assert calls, "the native path did not run"
        reference = block.valid_time_ref(x)
        monkeypatch.setenv("RTSED_NATIVE", "0")
        assert not _native_applies(block, x)
        torch_path = block.valid_time(x)
    assert len(calls) == 1
    assert out.shape == reference.shape == (2, c_out, 9, freq // pool)
    torch.testing.assert_close(out, reference, **_tol(dtype))
    torch.testing.assert_close(out, torch_path, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("c_in,state_layout", [(1, "channels_last"), (24, "channels_last"), (24, "nchw")])
def test_streaming_steps_read_the_history_in_place(native_on, monkeypatch, dtype, c_in, state_layout):
    """Steps of 1, 3, 4, 7 frames (fewer and more than the 4-frame history) through the native
    path equal the offline valid-time block over the whole input, and leave the history equal to
    the input's last 4 frames: advanced by the kernel in a channels-last state (init_state's
    layout on the CPU), by a torch copy in an NCHW one."""
    block = _eval_block(c_in, 24, 4, dtype, negative_scales=True)
    x = _channels_last(torch.randn(1, c_in, 15, 8, dtype=dtype))
    frames = torch.zeros(1, c_in, 4, 8, dtype=dtype)
    state = ConvHistory(_channels_last(frames) if state_layout == "channels_last" else frames)
    calls = []
    real = eval_block.depthwise_conv_leaky
    monkeypatch.setattr(eval_block, "depthwise_conv_leaky", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        outputs, t = [], 0
        for n in (1, 3, 4, 7):
            outputs.append(block.step(x[:, :, t:t + n], state))
            t += n
        assert len(calls) == 4
        offline = block.valid_time_ref(torch.cat([torch.zeros_like(state.frames), x], dim=2))
    torch.testing.assert_close(torch.cat(outputs, dim=2), offline, **_tol(dtype))
    assert torch.equal(state.frames, x[:, :, -4:])


def test_torch_path_runs_where_the_kernels_must_not(native_on, monkeypatch):
    block = _eval_block(8, 8, 2, torch.float32, negative_scales=False)
    x = _channels_last(torch.randn(1, 8, 9, 4))
    with torch.enable_grad():
        assert not _native_applies(block, x)  # autograd records through the weights
        out = block.valid_time(x)
        out.sum().backward()
    assert block.depthwise.weight.grad is not None
    with torch.no_grad():
        assert not _native_applies(block, x.half())
        assert _native_applies(block, x)
        monkeypatch.setenv("RTSED_NATIVE", "0")
        assert not _native_applies(block, x)
    monkeypatch.setenv("RTSED_NATIVE", "1")

    def never(*args, **kwargs):
        raise AssertionError("a native kernel ran while a graph was traced")

    monkeypatch.setattr(eval_block, "depthwise_conv_leaky", never)
    monkeypatch.setattr(eval_block, "pool_relu_affine", never)
    with torch.no_grad():
        traced = torch.jit.trace(block, (x,), check_trace=False)
        torch.testing.assert_close(traced(x), block.valid_time_ref(block_padded(block, x)),
                                   rtol=RTOL, atol=ATOL)


def block_padded(block: DWSBlock, x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, 0, block.context_frames - block.right_pad, block.right_pad))


def test_model_offline_and_streaming_agree_with_the_torch_path(native_on, monkeypatch):
    """float32 dnd through the native kernels (offline in 256-frame chunks, and 16-frame
    streaming steps) against the same model with RTSED_NATIVE=0."""
    from rtsed.stream.model_stream import stream_logits

    torch.manual_seed(0)
    model = build_model("dnd_7_10").eval()
    x = torch.randn(2, 600, 40)
    with torch.no_grad():
        native_offline = model(x)
        native_stream = stream_logits(model, x[0], [16] * 37)
        monkeypatch.setenv("RTSED_NATIVE", "0")
        torch_offline = model(x)
    torch.testing.assert_close(native_offline, torch_offline, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(native_stream, torch_offline[0], rtol=RTOL, atol=ATOL)
