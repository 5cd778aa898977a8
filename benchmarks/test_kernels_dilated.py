"""f_dil's Triton kernels against cuDNN on one GPU (skipped without CUDA).

Op: the dilated temporal conv (1 -> 256, 7 x 7, dilation (10, 1), stride (1, 3)) -> ReLU ->
BatchNorm of dnd_7_10, at the paper's batch: x (16, 1, 1024 + 60, 256) -> y (16, 256, 1024, 84).

- inference: eval-mode BN (running statistics), no autograd (``torch.inference_mode`` for cuDNN;
  the kernel launcher under ``torch.no_grad``);
- training: train-mode BN (batch statistics, running statistics updated), forward + backward of
  ``y.backward(cotangent)`` with x and every parameter requiring grad (x does in the model: it is the
  CNN's output); no optimizer;
- streaming: one ring step of ``dilated_step`` (1 or 16 new frames, 1 or 16 streams) against the
  stock-torch ``dilated_step_ref``: microseconds per step.

Implementations: ``triton`` (kernels.dilated_temporal), ``cudnn_nchw`` (F.conv2d -> relu ->
F.batch_norm on NCHW tensors, what ``DilatedTemporal.conv_relu_bn`` runs), ``cudnn_channels_last``
(the same with x and the weight in channels_last; the input has one channel, so the layout is set
with ``.to(memory_format=...)`` and the chosen layout is recorded in extra_info). Precisions:
``fp32`` (TF32 off on both sides: IEEE fp32 dots, the parity-rule setting), ``tf32`` (TF32 on on both
sides: torch's default for cuDNN convs) and ``fp16`` (x and conv weight fp16, BN parameters fp32 as
under autocast; fp32 accumulation).

Before timing, the Triton case checks parity with cuDNN at the benchmark shape (fp32 with TF32 off:
the parity rule |a - b| <= 1e-5 + 1e-4 |b| on the output, and on every gradient in training; fp16:
|a - b| <= 5e-3 max|b| + 5e-3 |b|, gradients 1e-2; tf32: 2e-3 relative to max|b|): the interpreter
tests cannot show races or TF32 error, this can.

extra_info: ms per call, useful TFLOP/s (2 x MACs of the convs autograd would run: the forward conv,
plus the weight- and input-gradient convs in training, whatever the kernel recomputes), effective
GB/s (the minimum traffic: read x and write y; training also reads the cotangent, and reads x and
writes dx again), and on the Triton case the speed-up over each cuDNN layout measured in the same
session (cuDNN time / Triton time). Each round synchronises the GPU at its end; inputs and
cotangents are made fresh in the untimed setup of each round.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._gpu import TF32
from benchmarks._report import RESULTS, measure, record

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

pytest.importorskip("triton")

B, T, C, C_OUT, K, D, S = 16, 1024, 256, 256, 7, 10, 3
W = (C - K) // S + 1  # 84
TP = T + (K - 1) * D
MACS = B * T * W * C_OUT * K * K
IMPLS = ["cudnn_nchw", "cudnn_channels_last", "triton"]  # triton last: its ratios read the others
PRECISIONS = ["fp32", "tf32", "fp16"]


def _kd():
    import kernels.dilated_temporal as kd

    if kd._INTERPRETED:
        pytest.skip("kernels.dilated_temporal was imported under TRITON_INTERPRET=1")
    return kd




def _dtype(precision: str) -> torch.dtype:
    return torch.float16 if precision == "fp16" else torch.float32


def _params(precision: str, requires_grad: bool) -> dict[str, torch.Tensor]:
    """Conv weight and bias in the compute dtype, BN parameters and running statistics in fp32."""
    g = torch.Generator(device="cuda").manual_seed(0)
    dev, dt = "cuda", _dtype(precision)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, device=dev) * scale + shift

    p = dict(weight=rnd(C_OUT, 1, K, K, scale=1 / K).to(dt), bias=rnd(C_OUT, scale=0.1).to(dt),
             bn_weight=rnd(C_OUT, scale=0.3, shift=1.0), bn_bias=rnd(C_OUT, scale=0.1),
             bn_running_mean=rnd(C_OUT, scale=0.1, shift=0.3), bn_running_var=rnd(C_OUT, scale=0.1, shift=1.0).abs())
    for name in ("weight", "bias", "bn_weight", "bn_bias"):
        p[name].requires_grad_(requires_grad)
    return p


def _x(precision: str, requires_grad: bool) -> torch.Tensor:
    x = torch.randn(B, 1, TP, C, device="cuda").to(_dtype(precision))
    return x.requires_grad_(requires_grad)


def _op(impl: str, kd):
    """(x, params, training) -> y for one implementation; channels_last converts x and the weight
    inside the call (cheap next to the conv: x is 17 MB) so that autograd sees the same leaves."""
    names = ("weight", "bias", "bn_weight", "bn_bias", "bn_running_mean", "bn_running_var")
    fn = kd.dilated_temporal if impl == "triton" else kd.dilated_temporal_ref

    def run(x, p, training):
        args = [p[n] for n in names]
        if impl == "cudnn_channels_last":
            x = x.to(memory_format=torch.channels_last)
            args[0] = args[0].to(memory_format=torch.channels_last)
        return fn(x, *args, dilation=D, stride=S, training=training, momentum=0.1, eps=1e-5)

    return run


def _parity(kd, precision: str, training: bool) -> dict[str, float]:
    """Triton vs cuDNN NCHW at the benchmark shape; returns the largest error / tolerance per tensor."""
    worst = {}
    with TF32(precision == "tf32"):
        x = _x(precision, training)
        outs = {}
        for impl in ("triton", "cudnn_nchw"):
            p = _params(precision, training)
            xi = x.detach().clone().requires_grad_(training)
            y = _op(impl, kd)(xi, p, training)
            grads = {}
            if training:
                ct = torch.randn(y.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
                y.backward(ct.to(y.dtype))
                grads = {"x": xi.grad, **{n: p[n].grad for n in ("weight", "bias", "bn_weight", "bn_bias")}}
                grads["running_var"] = p["bn_running_var"]
            outs[impl] = (y.detach(), grads)
        ya, ga = outs["triton"]
        yb, gb = outs["cudnn_nchw"]
        pairs = [("y", ya, yb)] + [(n, ga[n], gb[n]) for n in gb]
        for name, a, b in pairs:
            a, b = a.double(), b.double()
            grad = name != "y"
            if precision == "fp32":
                allowed = 1e-5 + 1e-4 * b.abs()
            elif precision == "fp16":
                tol = 1e-2 if grad else 5e-3
                allowed = tol * (b.abs().max() + b.abs())
            else:  # tf32: 10-bit mantissa inputs, different blocking on each side
                allowed = 2e-3 * b.abs().max() + 2e-3 * b.abs()
            ratio = float(((a - b).abs() / allowed).max())
            worst[name] = ratio
            assert ratio <= 1.0, f"{precision} {'train' if training else 'eval'} {name}: error {ratio:.3g} x tolerance"
        del outs, ya, yb, ga, gb
    torch.cuda.empty_cache()
    return worst


def _speedups(benchmark, res, figure: str, key: str) -> None:
    for impl in IMPLS[:2]:
        other = [r for r in RESULTS if r.figure == figure and r.model == f"{impl} {key}" and r.median_s]
        if other and res.median_s:
            benchmark.extra_info[f"speedup_vs_{impl}"] = other[-1].median_s / res.median_s
    res.extra = dict(benchmark.extra_info)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_dilated_inference(benchmark, impl, precision):
    benchmark.group = f"f_dil 7|10 conv+relu+BN inference, batch {B} x {T} frames, {precision}"
    kd = _kd()
    parity = _parity(kd, precision, training=False) if impl == "triton" else None
    op = _op(impl, kd)
    p = _params(precision, requires_grad=False)
    es = torch.finfo(_dtype(precision)).bits // 8

    def setup():
        x = _x(precision, requires_grad=False)
        torch.cuda.synchronize()
        return (x,), {}

    def infer(x):
        with torch.inference_mode():
            y = op(x, p, False)
        torch.cuda.synchronize()
        return y

    with TF32(precision == "tf32"):
        measure(benchmark, infer, setup, budget_s=3, min_rounds=10, max_rounds=200, warmup_rounds=3)
        y = infer(_x(precision, False))
    byts = (B * TP * C + B * C_OUT * T * W) * es
    res = record(benchmark, "gpu_dilated_inference", f"{impl} {precision}", impl=impl, precision=precision,
                 device=torch.cuda.get_device_name(), shape=f"x ({B}, 1, {TP}, {C}) -> y ({B}, {C_OUT}, {T}, {W})",
                 out_channels_last=y.is_contiguous(memory_format=torch.channels_last),
                 parity_worst_fraction_of_tolerance=parity,
                 derive=lambda t: {"ms_per_call": 1e3 * t, "tflops_useful": 2 * MACS / t / 1e12,
                                   "gb_per_s_effective": byts / t / 1e9,
                                   "frames_per_second": B * T / t})
    if impl == "triton":
        _speedups(benchmark, res, "gpu_dilated_inference", precision)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_dilated_training(benchmark, impl, precision):
    benchmark.group = f"f_dil 7|10 conv+relu+BN forward+backward (train-mode BN), batch {B} x {T} frames, {precision}"
    kd = _kd()
    parity = _parity(kd, precision, training=True) if impl == "triton" else None
    op = _op(impl, kd)
    p = _params(precision, requires_grad=True)
    es = torch.finfo(_dtype(precision)).bits // 8

    def setup():
        for name in ("weight", "bias", "bn_weight", "bn_bias"):
            p[name].grad = None
        x = _x(precision, requires_grad=True)
        ct = torch.randn(B, C_OUT, T, W, device="cuda", dtype=_dtype(precision))
        torch.cuda.synchronize()
        return (x, ct), {}

    def train_pass(x, ct):
        y = op(x, p, True)
        y.backward(ct)
        torch.cuda.synchronize()

    with TF32(precision == "tf32"):
        measure(benchmark, train_pass, setup, budget_s=4, min_rounds=5, max_rounds=100, warmup_rounds=3)
    x_bytes, y_bytes = B * TP * C * es, B * C_OUT * T * W * es
    byts = 3 * x_bytes + 2 * y_bytes
    res = record(benchmark, "gpu_dilated_training", f"{impl} {precision}", impl=impl, precision=precision,
                 device=torch.cuda.get_device_name(), parity_worst_fraction_of_tolerance=parity,
                 derive=lambda t: {"ms_per_call": 1e3 * t, "tflops_useful": 3 * 2 * MACS / t / 1e12,
                                   "gb_per_s_effective": byts / t / 1e9,
                                   "frames_per_second": B * T / t})
    if impl == "triton":
        _speedups(benchmark, res, "gpu_dilated_training", precision)


@pytest.mark.parametrize("frames", [1, 16])
@pytest.mark.parametrize("streams", [1, 16])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_dilated_step(benchmark, impl, streams, frames):
    """One ring step of f_dil 7|10 (fp32, TF32 off) on `streams` streams: write `frames` new frames,
    compute their (C_out * W) outputs. Ring capacity 60 + 64 frames; the write position advances."""
    benchmark.group = f"f_dil 7|10 streaming ring step, {streams} stream(s) x {frames} frame(s), fp32"
    _kd()
    import kernels.dilated_step as ks

    fn = ks.dilated_step if impl == "triton" else ks.dilated_step_ref
    p = _params("fp32", requires_grad=False)
    args = [p[n] for n in ("weight", "bias", "bn_weight", "bn_bias", "bn_running_mean", "bn_running_var")]
    capacity = (K - 1) * D + 64
    ring = torch.randn(streams, capacity, C, device="cuda")
    pos = {"write": 0}
    with TF32(False):
        new = torch.randn(streams, frames, C, device="cuda")
        got = ks.dilated_step(new, ring.clone(), 5, *args, dilation=D, stride=S)
        want = ks.dilated_step_ref(new, ring.clone(), 5, *args, dilation=D, stride=S)
        assert float(((got - want).abs() / (1e-5 + 1e-4 * want.abs())).max()) <= 1.0

    def setup():
        x = torch.randn(streams, frames, C, device="cuda")
        torch.cuda.synchronize()
        return (x,), {}

    def step(x):
        with torch.inference_mode():
            y = fn(x, ring, pos["write"], *args, dilation=D, stride=S)
        pos["write"] = (pos["write"] + frames) % capacity
        torch.cuda.synchronize()
        return y

    with TF32(False):
        measure(benchmark, step, setup, budget_s=2, min_rounds=50, max_rounds=5000, warmup_rounds=20)
    record(benchmark, "gpu_dilated_step", f"{impl} x{streams} n{frames}", impl=impl, streams=streams,
           frames_per_step=frames, device=torch.cuda.get_device_name(),
           derive=lambda t: {"us_per_step": 1e6 * t, "us_per_frame": 1e6 * t / (frames * streams)})
