"""rtsed.backends.native.head (the native kernels of rtsed.backends.cpu_head: its backward passes and its
eval-mode forward to logits) against plain torch.

- Each wrapper against its torch formula: float64 to ~1e-12, float32 at the parity rule; sizes
  that leave partial register tiles (channels, classes, columns, frames per thread); results that
  must not depend on the thread count (patch_scatter, class_products, dL/dz itself) compared
  bit for bit at 1 and 2 threads.
- cpu_head.dilated_head with the kernels (RTSED_NATIVE on) and with the torch compositions
  (RTSED_NATIVE=0) against the reference composition ``classifier(temporal(h))`` and against each
  other: logits, every gradient (input, conv, BN, classifier) and BN's running statistics, train
  and eval, kernel 3/5/7, dilation 1 and > 1, stride 2/3, time chunks that split frames unevenly
  (CHUNK_ROWS monkeypatched small).
"""

from __future__ import annotations

import copy

import pytest
import torch

from rtsed.backends import cpu_head
from rtsed.models.layers import DilatedTemporal
from rtsed.backends.native import head as native_head

ATOL, RTOL = 1e-5, 1e-4  # the parity rule of docs/streaming.md (fp32)
KERNELS = ("head_conv_relu_stats", "head_relu_grad", "head_conv_backward", "class_products_", "patch_scatter_")
# What cpu_head's float32/64 forward + backward run (head_relu_grad serves its bf16-GEMM variant).
NATIVE_PATH = {"head_conv_relu_stats", "head_conv_backward", "class_products_", "patch_scatter_"}


def _tol(dtype):
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": RTOL, "atol": ATOL}


# --- the wrappers against their torch formulas -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels,n_classes,frames,width", [
    (5, 3, 7, 5),  # channels all in the scalar tail
    (35, 5, 9, 4),  # one float64 register tile + tail
    (72, 16, 7, 6),  # one float32 register tile + tail, dnd's 16 classes
    (256, 19, 10, 9),  # dnd's channels, classes past 16
])
def test_head_relu_grad_matches_torch(native_on, dtype, batch, channels, n_classes, frames, width):
    torch.manual_seed(0)
    r = torch.randn(frames * width, channels, dtype=dtype).clamp_min(0)  # ReLU output: many exact zeros
    g = torch.randn(frames, n_classes, dtype=dtype)
    folded = torch.randn(n_classes, width * channels, dtype=dtype)  # (k, W C), as cpu_head folds it
    alpha, beta = (torch.randn(channels, dtype=dtype), torch.randn(channels, dtype=dtype)) if batch else (None, None)
    expected = (g @ folded).view(-1, channels)
    if batch:
        expected = expected + alpha + beta * r
    expected = torch.where(r > 0, expected, torch.zeros_like(expected))
    folded_w = folded.view(n_classes, width, channels).transpose(0, 1).contiguous()  # (W, k, C)

    dz, total = native_head.head_relu_grad(r, g, folded_w, alpha, beta)
    torch.testing.assert_close(dz, expected, **_tol(dtype))
    assert total.dtype == torch.float64  # of dz itself, summed in T over <= 64 rows, then float64
    magnitude = dz.double().abs().sum(0).max().item()
    torch.testing.assert_close(total, dz.double().sum(0), rtol=0,
                               atol=magnitude * (1e-14 if dtype == torch.float64 else 1e-6))
    in_place = r.clone()
    out, _ = native_head.head_relu_grad(in_place, g, folded_w, alpha, beta, out=in_place)
    assert out.data_ptr() == in_place.data_ptr()
    assert torch.equal(in_place, dz)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_classes", [1, 5, 8, 16, 19])
def test_class_products_matches_torch(native_on, dtype, n_classes):
    torch.manual_seed(1)
    frames, columns = 11, 3 * 32 + 7  # whole column tiles (16 doubles / 32 floats) and a tail
    g = torch.randn(frames, n_classes, dtype=dtype)
    r = torch.randn(frames, columns, dtype=dtype).clamp_min(0)
    out = torch.randn(n_classes, columns, dtype=dtype)  # accumulates onto what is there
    expected = out + g.t() @ r
    assert native_head.class_products_(out, g, r) is out
    torch.testing.assert_close(out, expected, **_tol(dtype))


GEOMETRIES = [  # kernel, dilation, stride, channels (width W = (channels - kernel) // stride + 1)
    (3, 1, 2, 16),
    (5, 4, 3, 23),
    (7, 10, 3, 40),
    (7, 1, 2, 20),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel,dilation,stride,channels", GEOMETRIES)
@pytest.mark.parametrize("batch,t0,t1", [(3, 0, 4), (1, 2, 9), (2, 5, 6)])
def test_patch_scatter_matches_torch(native_on, dtype, kernel, dilation, stride, channels, batch, t0, t1):
    """Against cpu_head's torch col2im, which is checked against the reference composition."""
    torch.manual_seed(2)
    width = (channels - kernel) // stride + 1
    frames = 10
    dx = torch.randn(batch, frames + (kernel - 1) * dilation, channels, dtype=dtype)
    d_patches = torch.randn(batch * (t1 - t0) * width, kernel * kernel, dtype=dtype)
    expected = dx.clone()
    cpu_head._scatter_patch_grads(expected, d_patches, t0, t1, kernel, dilation, stride, width)
    native_head.patch_scatter_(dx, d_patches, t0, t1, kernel, dilation, stride, width)
    torch.testing.assert_close(dx, expected, **_tol(dtype))


def test_patch_scatter_is_the_transpose_of_dilated_patches(native_on):
    """<dilated_patches(x), p> = <x, scatter(p)>: the adjoint identity, float64."""
    torch.manual_seed(3)
    kernel, dilation, stride, channels, t0, t1 = 5, 3, 2, 21, 1, 6
    width = (channels - kernel) // stride + 1
    x = torch.randn(2, 8 + (kernel - 1) * dilation, channels, dtype=torch.float64)
    p = torch.randn(2 * (t1 - t0) * width, kernel * kernel, dtype=torch.float64)
    dx = torch.zeros_like(x)
    native_head.patch_scatter_(dx, p, t0, t1, kernel, dilation, stride, width)
    lhs = (cpu_head.dilated_patches(x, t0, t1, kernel, dilation, stride, width) * p).sum()
    torch.testing.assert_close((x * dx).sum(), lhs, rtol=1e-12, atol=1e-12)


def _conv_backward_case(batch, frames, channels_in, c_out, n_classes, kernel, dilation, stride, train, dtype, seed=0):
    """Inputs of head_conv_backward for output frames [2, 2 + frames), and the torch formulas'
    (d_patches, d_weight, per-channel sum of dL/dz)."""
    g = torch.Generator().manual_seed(seed)
    width = (channels_in - kernel) // stride + 1
    t0, t1 = 2, 2 + frames
    x = torch.randn(batch, t1 + (kernel - 1) * dilation + 1, channels_in, generator=g, dtype=dtype)
    r = torch.randn(batch * frames * width, c_out, generator=g, dtype=dtype).clamp_min(0)
    grad = torch.randn(batch * frames, n_classes, generator=g, dtype=dtype)
    folded_w = torch.randn(width, n_classes, c_out, generator=g, dtype=dtype)
    alpha = torch.randn(c_out, generator=g, dtype=dtype) if train else None
    beta = torch.randn(c_out, generator=g, dtype=dtype) if train else None
    conv_weight = torch.randn(c_out, 1, kernel, kernel, generator=g, dtype=dtype)
    dz = torch.einsum("bk,wkc->bwc", grad, folded_w).reshape(-1, c_out)
    if train:
        dz = dz + alpha + beta * r
    dz = torch.where(r > 0, dz, torch.zeros_like(dz))
    patches = cpu_head.dilated_patches(x, t0, t1, kernel, dilation, stride, width)
    expected = (dz @ conv_weight.reshape(c_out, -1), dz.t() @ patches, dz.sum(0).double())
    args = (x, t0, t1, r, grad, folded_w, alpha, beta, native_head.padded_conv_weight(conv_weight), kernel, dilation,
            stride)
    return args, expected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("batch,frames,channels_in,c_out,n_classes,kernel,dilation,stride", [
    (2, 5, 40, 36, 5, 7, 3, 3),  # channels past whole vectors, frames past whole tiles
    (3, 11, 23, 64, 16, 5, 2, 2),  # 33 frames: a group of 32 rows and one more
    (1, 3, 16, 7, 3, 3, 1, 1),  # fewer frames than a tile
    (2, 9, 256, 256, 16, 7, 10, 3),  # dnd_7_10's geometry
])
def test_head_conv_backward_matches_torch(native_on, dtype, train, batch, frames, channels_in, c_out, n_classes,
                                          kernel, dilation, stride):
    args, (dp_expected, dw_expected, sum_expected) = _conv_backward_case(
        batch, frames, channels_in, c_out, n_classes, kernel, dilation, stride, train, dtype)
    width = args[5].shape[0]
    d_patches = torch.full((batch * frames * width, kernel * kernel), float("nan"), dtype=dtype)
    start = torch.randn(c_out, kernel * kernel, dtype=dtype)  # d_weight is accumulated into
    d_weight = start.clone()
    total = native_head.head_conv_backward(*args, d_patches, d_weight)
    assert dp_expected.abs().max() > 0.1
    tol = _tol(dtype) if dtype == torch.float64 else {"rtol": RTOL, "atol": ATOL * dw_expected.abs().max().item()}
    torch.testing.assert_close(d_patches, dp_expected, **tol)
    torch.testing.assert_close(d_weight, start + dw_expected, **tol)
    torch.testing.assert_close(total, sum_expected, **(tol if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-3}))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,frames,channels_in,c_out,kernel,dilation,stride", [
    (2, 5, 40, 36, 7, 3, 3),  # channels padded to whole register tiles, frames past whole tiles
    (3, 9, 23, 64, 5, 2, 2),
    (1, 3, 16, 7, 3, 1, 1),  # fewer frames than a tile
    (2, 13, 256, 256, 7, 10, 3),  # dnd_7_10's geometry
])
def test_head_conv_relu_stats_matches_torch(native_on, dtype, batch, frames, channels_in, c_out, kernel, dilation,
                                            stride):
    g = torch.Generator().manual_seed(1)
    width = (channels_in - kernel) // stride + 1
    t0, t1 = 2, 2 + frames
    x = torch.randn(batch, t1 + (kernel - 1) * dilation + 1, channels_in, generator=g, dtype=dtype)
    weight = torch.randn(c_out, 1, kernel, kernel, generator=g, dtype=dtype)
    bias = torch.randn(c_out, generator=g, dtype=dtype)
    patches = cpu_head.dilated_patches(x, t0, t1, kernel, dilation, stride, width)
    expected = (patches @ weight.reshape(c_out, -1).t() + bias).clamp_min(0)
    out = torch.full((batch * frames * width, c_out), float("nan"), dtype=dtype)
    total, squares = native_head.head_conv_relu_stats(x, t0, t1, native_head.taps_major_conv(weight, bias), kernel,
                                                      dilation, stride, width, out)
    assert (expected == 0).any() and (expected > 0).any()  # the ReLU cuts
    torch.testing.assert_close(out, expected, **_tol(dtype))
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(total, expected.double().sum(0), rtol=rtol, atol=rtol * expected.numel())
    torch.testing.assert_close(squares, expected.double().square().sum(0), rtol=rtol, atol=rtol * expected.numel())


def test_results_do_not_depend_on_thread_count(native_on, threads):
    torch.manual_seed(4)
    frames, width, channels, n_classes = 9, 7, 72, 16
    r = torch.randn(frames * width, channels).clamp_min(0)
    g = torch.randn(frames, n_classes)
    folded_w = torch.randn(width, n_classes, channels)
    alpha, beta = torch.randn(channels), torch.randn(channels)
    kernel, dilation, stride, t0, t1 = 7, 10, 3, 3, 8
    patch_width = (40 - kernel) // stride + 1
    d_patches = torch.randn(2 * (t1 - t0) * patch_width, kernel * kernel)
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        dz, _ = native_head.head_relu_grad(r, g, folded_w, alpha, beta)
        products = native_head.class_products_(torch.zeros(n_classes, width * channels), g,
                                               r.view(frames, width * channels))
        dx = torch.zeros(2, 20 + (kernel - 1) * dilation, 40)
        native_head.patch_scatter_(dx, d_patches, t0, t1, kernel, dilation, stride, patch_width)
        args, _ = _conv_backward_case(2, 9, 40, 72, 16, 7, 3, 3, True, torch.float32, seed=4)
        conv_d_patches = torch.empty(2 * 9 * args[5].shape[0], 49)
        conv_d_weight = torch.zeros(72, 49)
        conv_sum = native_head.head_conv_backward(*args, conv_d_patches, conv_d_weight)
        results.append(((dz, products, dx, conv_d_patches), (conv_sum, conv_d_weight)))
    for one, two in zip(results[0][0], results[1][0]):
        assert torch.equal(one, two)
    # Sums over a thread's rows (the weight gradient; the bias gradient's float32 partials) are
    # merged in thread order: equal up to rounding.
    for one, two in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(one.float(), two.float(), rtol=1e-5, atol=1e-4)


def test_wrappers_reject_bad_arguments(native_on):
    r = torch.rand(12, 8, dtype=torch.float64)
    g = torch.randn(4, 3, dtype=torch.float64)
    folded_w = torch.randn(3, 3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="do not match"):
        native_head.head_relu_grad(r, g, folded_w[:2])
    with pytest.raises(ValueError, match="both alpha and beta"):
        native_head.head_relu_grad(r, g, folded_w, alpha=torch.zeros(8, dtype=torch.float64))
    with pytest.raises(TypeError):
        native_head.head_relu_grad(r.float(), g, folded_w)
    with pytest.raises(ValueError, match="contiguous"):
        native_head.class_products_(torch.zeros(3, 24, dtype=torch.float64), g, r.view(4, 24).t().contiguous().t())
    args, _ = _conv_backward_case(1, 3, 16, 8, 3, 3, 1, 1, True, torch.float64)
    width = args[5].shape[0]
    with pytest.raises(ValueError, match="do not match"):
        native_head.head_conv_backward(*args, torch.empty(3 * width, 8, dtype=torch.float64),
                                       torch.zeros(8, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="do not fit"):
        native_head.head_conv_backward(*args[:2], 40, *args[3:], torch.empty(3 * width, 9, dtype=torch.float64),
                                       torch.zeros(8, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="reach outside"):
        native_head.patch_scatter_(torch.zeros(1, 10, 8, dtype=torch.float64), torch.zeros(2, 9, dtype=torch.float64),
                                   8, 10, 3, 1, 2, 1)


# --- dilated_head: native kernels and torch compositions against the reference -----------------


def _head(kernel, dilation, stride, channels, n_classes, dtype, training, causal):
    """A DilatedTemporal + Linear pair with non-trivial BN (running statistics away from 0/1,
    affine weights of both signs)."""
    torch.manual_seed(0)
    context = (kernel - 1) * dilation
    temporal = DilatedTemporal(channels, kernel, dilation, stride, right_pad=0 if causal else context // 2)
    model = torch.nn.ModuleDict({"temporal": temporal,
                                 "classifier": torch.nn.Linear(temporal.out_features, n_classes)}).to(dtype)
    with torch.no_grad():
        bn = temporal.bn
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return model.train(training)


def _run(model, h, grad, path, monkeypatch):
    """path: "reference", "native" or "torch" -> (logits, dL/dh, parameter gradients by name,
    BN running mean and variance), on a copy of the model. Checks which path really ran."""
    model = copy.deepcopy(model)
    h = h.clone().requires_grad_()
    calls = []
    for name in KERNELS:
        kernel_fn = getattr(native_head, name)
        monkeypatch.setattr(native_head, name, lambda *a, _f=kernel_fn, _n=name, **k: calls.append(_n) or _f(*a, **k))
    if path == "reference":
        logits = model["classifier"](model["temporal"](h))
    else:
        monkeypatch.setenv("RTSED_NATIVE", "1" if path == "native" else "0")
        args, kwargs = model["temporal"].head_arguments(model["classifier"])
        logits = cpu_head.dilated_head(h, *args, **kwargs)
    logits.backward(grad)
    assert set(calls) == (NATIVE_PATH if path == "native" else set()), f"{path} path called {set(calls)}"
    grads = {name: p.grad for name, p in model.named_parameters()}
    bn = model["temporal"].bn
    return logits.detach(), h.grad, grads, (bn.running_mean.clone(), bn.running_var.clone())


def _assert_same(actual, expected, what, rtol, atol):
    logits, dh, grads, stats = actual
    logits_e, dh_e, grads_e, stats_e = expected
    torch.testing.assert_close(logits, logits_e, rtol=rtol, atol=atol, msg=f"{what}: logits")
    torch.testing.assert_close(dh, dh_e, rtol=rtol, atol=atol, msg=f"{what}: dL/dh")
    assert grads.keys() == grads_e.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_e[name], rtol=rtol, atol=atol, msg=f"{what}: {name}")
    torch.testing.assert_close(stats, stats_e, rtol=1e-12, atol=1e-12, msg=f"{what}: running statistics")


@pytest.mark.parametrize("kernel,dilation,stride,channels", GEOMETRIES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("chunk_rows", [1, 100, 400], ids=["rows1", "rows100", "rows400"])
def test_head_native_and_torch_match_reference_fp64(native_on, monkeypatch, kernel, dilation, stride, channels,
                                                    training, chunk_rows):
    """Frames (37) split unevenly into chunks; chunk_rows 1 leaves fewer frames per chunk than
    the kernels' register blocks, 400 several blocks and a remainder per thread."""
    monkeypatch.setattr(cpu_head, "CHUNK_ROWS", chunk_rows)
    model = _head(kernel, dilation, stride, channels, 5, torch.float64, training, causal=kernel == 5)
    h = torch.randn(3, channels, 37, 1, dtype=torch.float64)
    grad = torch.randn(3, 37, 5, dtype=torch.float64)
    expected = _run(model, h, grad, "reference", monkeypatch)
    native_result = _run(model, h, grad, "native", monkeypatch)
    torch_result = _run(model, h, grad, "torch", monkeypatch)
    _assert_same(native_result, expected, "native vs reference", rtol=1e-10, atol=1e-10)
    _assert_same(torch_result, expected, "torch vs reference", rtol=1e-10, atol=1e-10)
    _assert_same(native_result, torch_result, "native vs torch", rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_head_native_dnd_geometry_fp64(native_on, monkeypatch, training):
    """dnd_7_10's f_dil (256 channels, K 7, d 10, S 3: W 84) and 16 classes: the kernels' full
    register tiles, against the reference."""
    monkeypatch.setattr(cpu_head, "CHUNK_ROWS", 1500)  # 5 frames of 2 x 84 rows: 45 splits 9 ways
    model = _head(7, 10, 3, 256, 16, torch.float64, training, causal=False)
    h = torch.randn(2, 256, 45, 1, dtype=torch.float64)
    grad = torch.randn(2, 45, 16, dtype=torch.float64)
    expected = _run(model, h, grad, "reference", monkeypatch)
    _assert_same(_run(model, h, grad, "native", monkeypatch), expected, "native vs reference", rtol=1e-10,
                 atol=1e-10)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_head_native_fp32_parity(native_on, monkeypatch, training):
    """float32, dnd_7_10's geometry: logits at the parity rule against the reference; every
    gradient against the torch compositions in float32 (the same algorithm, reordered sums) and
    against the float64 reference, at the parity rule relative to each gradient's scale (BN's
    train-mode backward cancels large sums, where float32 orderings alone differ)."""
    model = _head(7, 10, 3, 256, 16, torch.float32, training, causal=False)
    h = torch.randn(2, 256, 60, 1)
    grad = torch.randn(2, 60, 16)
    native_result = _run(model, h, grad, "native", monkeypatch)
    torch_result = _run(model, h, grad, "torch", monkeypatch)
    reference = _run(copy.deepcopy(model).double(), h.double(), grad.double(), "reference", monkeypatch)
    logits, dh, grads, _ = native_result
    torch.testing.assert_close(logits, reference[0].float(), rtol=RTOL, atol=ATOL)
    reference_grads = {"dL/dh": reference[1], **reference[2]}
    torch_grads = {"dL/dh": torch_result[1], **torch_result[2]}
    for other, what in ((torch_result, "torch fp32"), (reference, "reference fp64")):
        for name, actual, expected in [("dL/dh", dh, other[1]), *((n, grads[n], other[2][n]) for n in grads)]:
            expected = expected.float()
            scale = expected.abs().max().item()
            atol = ATOL * max(scale, 1.0)
            if what == "torch fp32":  # two float32 orderings differ by up to torch's own rounding error,
                # which depends on its thread count; native against float64 holds the plain rule below
                atol += (torch_grads[name].double() - reference_grads[name].double()).abs().max().item()
            torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=f"native vs {what}: {name}")


# --- head_logits: the eval-mode forward straight to logits -------------------------------------


def _head_logits_reference(x, n, conv_weight, conv_bias, folded, folded_bias, dilation, stride, width):
    """f_dil (torch's conv2d) -> ReLU -> flatten channel-major -> the folded classifier:
    x (B, Tx, C) -> logits (B, n, n_classes) for output frames [0, n)."""
    z = torch.nn.functional.conv2d(x[:, None], conv_weight, conv_bias, stride=(1, stride), dilation=(dilation, 1))
    r = z[:, :, :n, :width].relu()  # (B, C_out, n, W)
    return r.permute(0, 2, 1, 3).reshape(x.shape[0], n, -1) @ folded.t() + folded_bias


def _head_logits_case(batch, frames, channels, c_out, n_classes, kernel, dilation, stride, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = (channels - kernel) // stride + 1
    # A window view as the ring gives it: batch stride longer than T x C, two frames cut off each end.
    ring = torch.randn(batch, frames + (kernel - 1) * dilation + 4, channels, generator=g, dtype=dtype)
    x = ring[:, 2:-2]
    conv_weight = torch.randn(c_out, 1, kernel, kernel, generator=g, dtype=dtype) / kernel
    conv_bias = torch.randn(c_out, generator=g, dtype=dtype)
    folded = torch.randn(n_classes, c_out * width, generator=g, dtype=dtype) / (c_out * width) ** 0.5
    folded_bias = torch.randn(n_classes, generator=g, dtype=dtype)
    weights = native_head.head_logits_weights(conv_weight, conv_bias, folded, folded_bias, width)
    expected = _head_logits_reference(x, frames, conv_weight, conv_bias, folded, folded_bias, dilation, stride, width)
    return x, weights, expected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,frames,channels,c_out,n_classes,kernel,dilation,stride", [
    (1, 16, 256, 256, 16, 7, 10, 3),  # dnd_7_10 streaming at 16 frames per step
    (1, 1, 256, 256, 16, 7, 10, 3),  # one frame: a register tile of 6 rows with 5 repeats
    (3, 50, 40, 70, 5, 5, 4, 2),  # channels and classes padded; frames past one work unit (48)
    (2, 97, 23, 8, 17, 3, 1, 1),  # classes past one vector; two units per batch item and a remainder
])
def test_head_logits_matches_torch(native_on, dtype, batch, frames, channels, c_out, n_classes, kernel, dilation,
                                   stride):
    x, weights, expected = _head_logits_case(batch, frames, channels, c_out, n_classes, kernel, dilation, stride,
                                             dtype)
    assert batch == 1 or not x.is_contiguous()  # read in place through its strides
    got = native_head.head_logits(x, frames, weights, n_classes, kernel, dilation, stride)
    assert got.shape == (batch, frames, n_classes)
    assert expected.std() > 0.1  # logits that vary: a constant or zero output cannot pass
    torch.testing.assert_close(got, expected, **_tol(dtype))


def test_head_logits_does_not_depend_on_thread_count(native_on, threads):
    x, weights, _ = _head_logits_case(4, 70, 256, 256, 16, 7, 10, 3, torch.float32, seed=3)
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        results.append(native_head.head_logits(x, 70, weights, 16, 7, 10, 3))
    assert torch.equal(*results)


def test_head_logits_rejects_bad_arguments(native_on):
    x, weights, _ = _head_logits_case(1, 16, 256, 256, 16, 7, 10, 3, torch.float64)
    with pytest.raises(ValueError, match="do not fit"):
        native_head.head_logits(x, 17, weights, 16, 7, 10, 3)  # one frame more than x holds
    with pytest.raises(ValueError, match="contiguous channels"):
        native_head.head_logits(x.transpose(1, 2), 16, weights, 16, 7, 10, 3)
    with pytest.raises(TypeError):
        native_head.head_logits(x.float(), 16, weights, 16, 7, 10, 3)


@pytest.mark.parametrize("kernel,dilation,stride,channels", GEOMETRIES)
def test_eval_inference_runs_head_logits(native_on, monkeypatch, kernel, dilation, stride, channels):
    """Offline inference (eval mode, no autograd; the op rtsed.ops.dilated_head, as the layer calls it) takes head_logits, against the reference in
    float64; with RTSED_NATIVE=0, or with autograd recording (it has no backward), it does not."""
    model = _head(kernel, dilation, stride, channels, 5, torch.float64, training=False, causal=kernel == 5)
    h = torch.randn(2, channels, 53, 1, dtype=torch.float64)
    calls = []
    real = native_head.head_logits
    monkeypatch.setattr(native_head, "head_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        expected = model["classifier"](model["temporal"](h))
        got = model["temporal"].logits(h, model["classifier"])
        assert len(calls) == 1
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        monkeypatch.setenv("RTSED_NATIVE", "0")
        torch.testing.assert_close(model["temporal"].logits(h, model["classifier"]), expected,
                                   rtol=1e-12, atol=1e-12)
    monkeypatch.setenv("RTSED_NATIVE", "1")
    model["temporal"].logits(h.requires_grad_(), model["classifier"]).sum().backward()
    assert len(calls) == 1 and h.grad is not None
