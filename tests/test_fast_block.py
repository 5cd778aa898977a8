"""rtsed.backends.cpu_block (training-mode DWS block: native fused passes + MKL/oneDNN) and the native
kernels it runs (rtsed.backends.native, rtsed.backends.native.block), against stock torch.

- The block against its op's stock-torch twin (``block.valid_time_ref(x)``): output,
  every parameter gradient, the input gradient, running statistics and num_batches_tracked, in
  float64 to ~1e-12 (the arithmetic is the reference's, reordered) and float32 under docs/streaming.md's
  parity rule; block-1 shapes (one input channel) and true depthwise ones, K = 3/5/7, pools that
  drop frequencies, BN scales of both signs and zero (the pool's pick changes with the sign).
- Each native function against a plain torch formula, including ties in the pool and the
  channel tails that the 64-byte vector blocks of the depthwise backward leave over.
- The build: cached, rebuilt when a source changes, a compiler error surfaces with its message,
  no compiler falls back to the torch composition with one warning that names the fix.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from rtsed.backends import cpu_block, dispatch, native
from rtsed.backends.dispatch import channels_last_convs
from rtsed.models.layers import DWSBlock
from rtsed.backends.native import block as native_block

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler to build rtsed.backends.native")

ATOL, RTOL = 1e-5, 1e-4  # the parity rule of docs/streaming.md (fp32)


def _block_pair(c_in, channels, kernel, pool, dtype, dropout=0.0, gamma_zero=False):
    torch.manual_seed(0)
    block = DWSBlock(c_in, channels, kernel, pool, dropout, right_pad=kernel // 2).to(dtype)
    with torch.no_grad():
        for bn in (block.inner_bn, block.bn):
            bn.weight.uniform_(-1.5, 1.5)  # both signs: the pool picks a max or a min
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        if gamma_zero:
            block.bn.weight[:3] = 0.0  # constant BN output: torch's pool keeps the first position
    return block.train(), copy.deepcopy(block).train()


def _cpu_block_applies(block, x):
    """dispatch's cpu-train check on the block's facts, as rtsed.ops.block asks it."""
    return dispatch.cpu_block_applies(x, block.kernel, block.pool_size, block.training)


def _run(block, x, backend):
    """Forward + backward with a fixed output gradient; returns (out, x.grad, {name: grad})."""
    x = x.detach().clone().requires_grad_(x.shape[1] > 1)
    if backend == "ref":
        with dispatch.forced_backend("ref"):
            out = block.valid_time(x)
    else:
        with channels_last_convs():
            out = block.valid_time(x)
    torch.manual_seed(123)
    grad = torch.randn(out.shape, dtype=out.dtype)
    (out * grad).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}


GEOMETRIES = [  # (C_in, C, K, P, F): block 1 of dnd, true depthwise, K 3/7, pools dropping bins
    (1, 16, 5, 5, 40),
    (12, 12, 5, 4, 9),
    (16, 16, 3, 2, 3),
    (1, 12, 7, 2, 5),
    (24, 24, 7, 1, 6),
]


@pytest.mark.parametrize("c_in,channels,kernel,pool,freq", GEOMETRIES)
@pytest.mark.parametrize("gamma_zero", [False, True], ids=["gamma", "gamma0"])
def test_block_matches_reference_fp64(c_in, channels, kernel, pool, freq, gamma_zero):
    fast, ref = _block_pair(c_in, channels, kernel, pool, torch.float64, gamma_zero=gamma_zero)
    x = torch.randn(3, c_in, 11 + kernel - 1, freq, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert _cpu_block_applies(fast, x)
    out, dx, grads = _run(fast, x, "auto")
    out_ref, dx_ref, grads_ref = _run(ref, x, "ref")
    torch.testing.assert_close(out, out_ref, rtol=1e-11, atol=1e-12)
    if dx_ref is not None:
        torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-12)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-11, msg=name)
    for (name, buf), (_, buf_ref) in zip(fast.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(buf, buf_ref, rtol=1e-11, atol=1e-12, msg=name)


@pytest.mark.parametrize("c_in,channels,kernel,pool,freq", GEOMETRIES[:3])
def test_block_fp32_parity(c_in, channels, kernel, pool, freq):
    fast, ref = _block_pair(c_in, channels, kernel, pool, torch.float32)
    x = torch.randn(4, c_in, 20 + kernel - 1, freq).contiguous(memory_format=torch.channels_last)
    out, dx, grads = _run(fast, x, "auto")
    out_ref, dx_ref, grads_ref = _run(ref, x, "ref")
    torch.testing.assert_close(out, out_ref, rtol=RTOL, atol=ATOL)
    if dx_ref is not None:
        torch.testing.assert_close(dx, dx_ref, rtol=RTOL, atol=ATOL)
    for name in grads_ref:
        # Train-mode BN gradients sum over every position with cancellation: fp32 orderings
        # alone differ ~1e-4 relative to the largest gradient.
        scale = grads_ref[name].abs().max().item()
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-4 * scale, msg=name)


def test_block_dropout_draws_match_reference():
    """Dropout2d stays the block's own module, applied to the same-shaped output: with one seed
    both paths drop the same channels."""
    fast, ref = _block_pair(8, 8, 5, 2, torch.float64, dropout=0.5)
    x = torch.randn(2, 8, 14, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(7)
    with channels_last_convs():
        out = fast.valid_time(x)
    torch.manual_seed(7)
    with dispatch.forced_backend("ref"):
        out_ref = ref.valid_time(x)
    assert (out == 0).any()
    torch.testing.assert_close(out, out_ref, rtol=1e-11, atol=1e-12)


def test_block_is_used_for_training_only_and_falls_back_when_disabled(monkeypatch):
    block, _ = _block_pair(8, 8, 5, 2, torch.float32)
    x = torch.randn(1, 8, 12, 4).contiguous(memory_format=torch.channels_last)
    calls = []
    train = cpu_block.dws_block_train
    monkeypatch.setattr(cpu_block, "dws_block_train", lambda x, *a, **k: calls.append(1) or train(x, *a, **k))
    block.valid_time(x)
    assert calls == [1]
    block.eval()
    block.valid_time(x)  # the folded eval path
    block.train()
    monkeypatch.setenv("RTSED_NATIVE", "0")
    assert not _cpu_block_applies(block, x)
    block.valid_time(x)
    assert calls == [1]


def test_backward_twice_is_a_clear_error():
    block, _ = _block_pair(8, 8, 5, 2, torch.float64)
    x = torch.randn(1, 8, 12, 4, dtype=torch.float64, requires_grad=True)
    with channels_last_convs():
        out = block.valid_time(x).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.backward()


# ----------------------------------------------------------------------------------------------
# The native functions one by one
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("slope", [0.0, 0.01])
def test_act_stats(dtype, slope):
    z = torch.randn(300, 20, dtype=dtype)
    a = z.clone()
    total, squares = native_block.act_stats(a, slope, write=True)
    expected = F.leaky_relu(z, slope)
    torch.testing.assert_close(a, expected, rtol=0, atol=0)
    torch.testing.assert_close(total, expected.double().sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(squares, expected.double().square().sum(0), rtol=1e-6, atol=1e-6)
    untouched = z.clone()
    native_block.act_stats(untouched, slope, write=False)
    assert torch.equal(untouched, z)


def test_relu_stats_pool_picks_as_torch_max_pool_does():
    """The pick equals max_pool2d of the BN output for scales of each sign, ties included (torch
    keeps the first of equal values), and the last F mod P bins count in the statistics only."""
    torch.manual_seed(0)
    outer, freq, channels, pool = 6, 11, 9, 3
    z = torch.randn(outer, freq, channels, dtype=torch.float64).round(decimals=0)  # many exact ties
    scale = torch.tensor([1.3, -0.7, 0.0, 2.0, -1.0, 0.5, -0.2, 0.0, 1.0], dtype=torch.float64)
    shift = torch.linspace(-1, 1, channels, dtype=torch.float64)
    picked, argpos, total, squares = native_block.relu_stats_pool(z, pool, torch.sign(scale))
    r = z.clamp_min(0)
    y = (r * scale + shift).permute(2, 0, 1)[None]  # (1, C, outer, F)
    expected, indices = F.max_pool2d(y, (1, pool), (1, pool), return_indices=True)
    torch.testing.assert_close((picked * scale + shift).permute(2, 0, 1)[None], expected, rtol=0, atol=1e-15)
    window_start = (torch.arange(freq // pool) * pool)[None, None, None]
    assert torch.equal(argpos.long().permute(2, 0, 1)[None], indices % freq - window_start)
    torch.testing.assert_close(total, r.sum((0, 1)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(squares, r.square().sum((0, 1)), rtol=1e-12, atol=1e-12)


def test_relu_bn_pool_backward_formula():
    torch.manual_seed(1)
    outer, freq, channels, pool = 4, 7, 5, 2
    z = torch.randn(outer, freq, channels, dtype=torch.float64)
    direction = torch.ones(channels, dtype=torch.float64)
    picked, argpos, _, _ = native_block.relu_stats_pool(z, pool, direction)
    grad = torch.randn_like(picked)
    scale, alpha, beta = (torch.randn(channels, dtype=torch.float64) for _ in range(3))
    dz = z.clone()
    total = native_block.relu_bn_pool_backward(dz, grad, argpos, scale, alpha, beta, pool)
    landed = torch.zeros_like(z)
    positions = argpos.long() + (torch.arange(freq // pool) * pool)[None, :, None]
    landed.scatter_(1, positions, grad)
    r = z.clamp_min(0)
    expected = torch.where(z > 0, scale * landed + alpha + beta * r, torch.zeros_like(z))
    torch.testing.assert_close(dz, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(total, expected.sum((0, 1)), rtol=1e-12, atol=1e-12)


def test_grad_sums_and_leaky_bn_backward():
    torch.manual_seed(2)
    g, a = torch.randn(50, 7, dtype=torch.float64), torch.randn(50, 7, dtype=torch.float64)
    total, products = native_block.grad_sums(g, a)
    torch.testing.assert_close(total, g.sum(0))
    torch.testing.assert_close(products, (g * a).sum(0))
    scale, alpha, beta = (torch.randn(7, dtype=torch.float64) for _ in range(3))
    dz = g.clone()
    dz_sum = native_block.leaky_bn_backward(dz, a, scale, alpha, beta, 0.01)
    expected = (scale * g + alpha + beta * a) * torch.where(a > 0, 1.0, 0.01)
    torch.testing.assert_close(dz, expected)
    torch.testing.assert_close(dz_sum, expected.sum(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c_in,channels,kernel", [(1, 20, 5), (20, 20, 5), (37, 37, 3), (1, 16, 7)])
def test_depthwise_backward_matches_torch(dtype, c_in, channels, kernel):
    """Weight and input gradients of the depthwise conv, channel counts with and without a tail
    beyond the 64-byte vector blocks (16 floats, 8 doubles)."""
    torch.manual_seed(3)
    b, frames, freq = 2, 9, 6
    x = torch.randn(b, c_in, frames + kernel - 1, freq, dtype=dtype, requires_grad=True)
    weight = torch.randn(channels, 1, kernel, kernel, dtype=dtype, requires_grad=True)
    out = F.conv2d(x, weight, padding=(0, kernel // 2), groups=c_in)
    grad = torch.randn_like(out)
    out.backward(grad)
    dd = grad.permute(0, 2, 3, 1).contiguous()  # (B, T, F, C)
    half = kernel // 2
    x_padded = F.pad(x.detach().permute(0, 2, 3, 1), (0, 0, half, half)).contiguous()
    dw = native_block.depthwise_weight_grad(dd, x_padded, kernel)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw.view_as(weight), weight.grad, **tol)
    if c_in == channels:
        dd_padded = F.pad(dd, (0, 0, half, half, kernel - 1, kernel - 1))
        dx = native_block.depthwise_input_grad(dd_padded, weight.detach().reshape(channels, -1).contiguous(), kernel)
        torch.testing.assert_close(dx.permute(0, 3, 1, 2), x.grad, **tol)


def test_native_wrappers_reject_bad_input():
    with pytest.raises(ValueError, match="contiguous"):
        native_block.act_stats(torch.randn(8, 4).t(), 0.0, write=True)
    with pytest.raises(TypeError, match="float32 or float64"):
        native_block.grad_sums(torch.ones(2, 2, dtype=torch.float16), torch.ones(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="kernel size"):
        native_block.depthwise_weight_grad(torch.zeros(1, 2, 4, 4), torch.zeros(1, 5, 7, 4), 4)


# ----------------------------------------------------------------------------------------------
# The build
# ----------------------------------------------------------------------------------------------


def test_build_is_cached_and_keyed_by_source(tmp_path, monkeypatch):
    first = native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    source = tmp_path / "src"
    source.mkdir()
    for path in native.sources():
        (source / path.name).write_text(path.read_text())
    (source / "extra.cpp").write_text('extern "C" int rtsed_probe() { return 42; }\n')
    monkeypatch.setattr(native, "FOLDER", source)
    second = native.build(tmp_path)
    assert second != first
    import ctypes

    assert ctypes.CDLL(str(second)).rtsed_probe() == 42


def test_compiler_error_is_reported(tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    (source / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(native, "FOLDER", source)
    with pytest.raises(native.NativeBuildError, match="broken.cpp|not C\\+\\+|error"):
        native.build(tmp_path / "cache")


def test_missing_compiler_warns_once_and_training_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("RTSED_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    block, ref = _block_pair(8, 8, 5, 2, torch.float64)
    x = torch.randn(1, 8, 12, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not _cpu_block_applies(block, x)
        assert not native.available()
        out = block.valid_time(x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "apt-get install g++" in messages[0] and "no-such-compiler" in messages[0]
    with dispatch.forced_backend("ref"):
        torch.testing.assert_close(out, ref.valid_time(x))


# ----------------------------------------------------------------------------------------------
# bf16 (CPU autocast): the fast paths' GEMMs in bfloat16, everything else float32
# ----------------------------------------------------------------------------------------------


def test_bf16_autocast_training_step_is_as_close_to_fp32_as_stock_autocast():
    """Under torch.autocast("cpu", bfloat16) the model's fast paths (this block and rtsed.backends.cpu_head)
    keep float32 interfaces (the native kernels never see bf16: that crashed before) and run
    their big GEMMs in bf16. The step's logits and gradients then differ from the float32 step
    by bf16 rounding, amplified through train-mode BN (10-20 % on this random-init network),
    and by no more than stock torch's autocast of the reference composition differs; not by
    zero (the bf16 GEMMs really ran)."""
    from rtsed.models.model import build_model

    torch.manual_seed(0)
    model = build_model("dnd_7_10", n_classes=4, channels=32, dropout=0.0).train()
    stock, fast = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(2, 80, 40)
    with dispatch.forced_backend("ref"):
        logits32 = model(x)
        logits32.square().mean().backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits_stock = stock(x).float()
        logits_stock.square().mean().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_fast = fast(x)
    assert logits_fast.dtype == torch.float32
    logits_fast.square().mean().backward()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    def grads(m):
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    assert all(p.grad.dtype == torch.float32 for p in fast.parameters())
    assert 0 < rel(logits_fast, logits32) <= max(rel(logits_stock, logits32), 1e-3)
    assert 0 < rel(grads(fast), grads(model)) <= rel(grads(stock), grads(model))


def test_unwritable_cache_falls_back_with_a_warning_naming_the_fix(tmp_path, monkeypatch):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("RTSED_NATIVE_CACHE", str(not_a_folder / "native"))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not native.available()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "RTSED_NATIVE_CACHE" in messages[0] and "RTSED_NATIVE=0" in messages[0]
