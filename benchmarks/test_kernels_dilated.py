"""f_dil's Triton kernels against cuDNN on one GPU (skipped without CUDA).

Op: the dilated temporal conv (1 -> 256, 7 x 7, dilation (10, 1), stride (1, 3)) -> ReLU ->
BatchNorm of dnd_7_10, at the paper's batch: x (16, 1, 1024 + 60, 256) -> y (16, 256, 1024, 84).

- inference: eval-mode BN (running statistics), no autograd (``torch.inference_mode`` for cuDNN;
  the kernel launcher under ``torch.no_grad``);
- training: train-mode BN (batch statistics, running statistics updated), forward + backward of
  ``y.backward(cotangent)`` with x and every parameter requiring grad (x does in the model: it is the
  CNN's output); no optimizer;
- streaming: one ring step of ``dilated_step`` (1 or 16 new frames, 1 or 16 streams) against the
  stock-torch ``dilated_step_ref``: microseconds per step; and the ring step fused with the
  16-class classifier (``dilated_step_logits``, what a streaming model runs on CUDA) against the
  unfused step then ``F.linear``, up to 10,000 streams x 16 frames: microseconds per step and
  the step's peak memory.

Implementations: ``triton`` (kernels.dilated_temporal), ``cudnn_nchw`` (F.conv2d -> relu ->
F.batch_norm on NCHW tensors, what ``DilatedTemporal.conv_relu_bn`` runs), ``cudnn_channels_last``
(the same with x and the weight in channels_last; the input has one channel, so the layout is set
with ``.to(memory_format=...)`` and the chosen layout is recorded in extra_info). Precisions:
``fp32`` (TF32 off on both sides: IEEE fp32 dots, the parity-rule setting), ``tf32`` (TF32 on on both
sides: torch's default for cuDNN convs) and ``fp16`` (x and conv weight fp16, BN parameters fp32 as
under autocast; fp32 accumulation).

Before timing, the Triton case checks parity (``_parity``): fp32 with TF32 off against the fp64
reference under the parity rule |a - b| <= 1e-5 + 1e-4 |b| at a small batch, where fp32 can meet it,
with the full-size relative L2 errors against fp64 reported beside cuDNN fp32's; fp16 (|a - b| <=
5e-3 max|b| + 5e-3 |b|, gradients 1e-2) and tf32 (2e-3 relative to max|b|) against cuDNN at the
full size. The interpreter tests cannot show races or TF32 error, this can.

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
from benchmarks._report import DIL_STEP_LOGITS, HOP_S, RESULTS, measure, record

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


PARITY_B, PARITY_T = 1, 32  # the asserted fp32 check's batch: rows few enough for the fp32 parity rule


def _forward_backward(fn, x, p, training, ct):
    """y and, in training, the gradients of x and of every parameter for cotangent ct, plus the
    updated running variance; x and p are copied to fresh leaves (dtype kept)."""
    xi = x.detach().clone().requires_grad_(training)
    pi = {n: (v.detach().clone().requires_grad_(training and n in ("weight", "bias", "bn_weight", "bn_bias")))
          for n, v in p.items()}
    names = ("weight", "bias", "bn_weight", "bn_bias", "bn_running_mean", "bn_running_var")
    y = fn(xi, *[pi[n] for n in names], dilation=D, stride=S, training=training, momentum=0.1, eps=1e-5)
    out = {"y": y.detach()}
    if training:
        y.backward(ct.to(y.dtype))
        out.update(x=xi.grad, **{n: pi[n].grad for n in ("weight", "bias", "bn_weight", "bn_bias")})
        out["running_var"] = pi["bn_running_var"]
    return out


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _parity(kd, precision: str, training: bool) -> dict[str, float]:
    """Checks the kernel before it is timed; returns what it measured per tensor.

    fp32 (TF32 off): the parity rule |a - b| <= 1e-5 + 1e-4 |b| is asserted against the fp64
    reference at a small batch (B = 1, T = 32: full channel counts, few enough rows that fp32
    itself meets the rule), because at the full batch fp32 cannot meet it against anything: the
    input gradient of fp32 against fp64 on the CPU exceeds it 10,000-fold, and two fp32 orders of
    the same GEMM differ 42-fold. At the full size the relative L2 errors of the kernel and of
    cuDNN fp32, both against fp64, are reported (``full_<tensor>_rel_l2[_cudnn]``), not asserted.
    fp16 and tf32: against cuDNN at the same precision and full size, tolerances relative to the
    largest value (fp16: 5e-3, gradients 1e-2; tf32: 2e-3), asserted."""
    worst: dict[str, float] = {}
    gen = torch.Generator(device="cuda").manual_seed(1)
    with TF32(precision == "tf32"):
        if precision == "fp32":
            x = torch.randn(PARITY_B, 1, PARITY_T + (K - 1) * D, C, device="cuda", generator=gen)
            ct = torch.randn(PARITY_B, C_OUT, PARITY_T, W, device="cuda", generator=gen)
            p = _params("fp32", False)
            got = _forward_backward(kd.dilated_temporal, x, p, training, ct)
            want = _forward_backward(kd.dilated_temporal_ref, x.double(), {n: v.double() for n, v in p.items()},
                                     training, ct.double())
            for name, b in want.items():
                a, b = got[name].double(), b.double()
                ratio = float(((a - b).abs() / (1e-5 + 1e-4 * b.abs())).max())
                worst[f"small_{name}"] = ratio
                assert ratio <= 1.0, (f"fp32 {'train' if training else 'eval'} {name} at B={PARITY_B}, "
                                      f"T={PARITY_T} against fp64: error {ratio:.3g} x the parity tolerance")
            del got, want
        x = _x(precision, False)
        ct = torch.randn(B, C_OUT, T, W, device="cuda", generator=gen)
        p = _params(precision, False)
        got = _forward_backward(kd.dilated_temporal, x, p, training, ct)
        cudnn = _forward_backward(kd.dilated_temporal_ref, x, p, training, ct)
        if precision == "fp32":  # reported only: see the docstring
            exact = _forward_backward(kd.dilated_temporal_ref, x.double(), {n: v.double() for n, v in p.items()},
                                      training, ct.double())
            for name, b in exact.items():
                worst[f"full_{name}_rel_l2"] = _rel_l2(got[name], b)
                worst[f"full_{name}_rel_l2_cudnn"] = _rel_l2(cudnn[name], b)
            del exact
        else:
            for name, b in cudnn.items():
                a, b = got[name].double(), b.double()
                tol = (1e-2 if name != "y" else 5e-3) if precision == "fp16" else 2e-3
                ratio = float(((a - b).abs() / (tol * (b.abs().max() + b.abs()))).max())
                worst[name] = ratio
                assert ratio <= 1.0, f"{precision} {'train' if training else 'eval'} {name}: error {ratio:.3g} x tolerance"
        del got, cudnn
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
                 parity=parity,
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
                 device=torch.cuda.get_device_name(), parity=parity,
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


N_CLASSES = 16
STEP_LOGITS_CASES = [(1, 1), (16, 16), (10_000, 1), (10_000, 16)]


@pytest.mark.parametrize("streams, frames", STEP_LOGITS_CASES, ids=[f"x{s}-n{n}" for s, n in STEP_LOGITS_CASES])
@pytest.mark.parametrize("impl", ["step_then_linear", "fused"])
def test_dilated_step_logits(benchmark, impl, streams, frames):
    """One ring step of f_dil 7|10 and the 16-class classifier (fp32, TF32 off) on `streams`
    streams: ``fused`` (kernels.dilated_step_logits: the logits straight from the ring) against
    ``step_then_linear`` (kernels.dilated_step's (streams, frames, 21,504) output, then F.linear:
    13.8 GB at 10,000 x 16). Records us per step and the step's peak GPU memory beyond the ring
    and its input; a case that does not fit is skipped with the reason (benchmarks/conftest.py)."""
    benchmark.group = f"f_dil 7|10 + classifier ring step, {streams} stream(s) x {frames} frame(s), fp32"
    _kd()
    import torch.nn.functional as F

    import kernels.dilated_step as ks
    import kernels.dilated_step_logits as ksl

    p = _params("fp32", requires_grad=False)
    g = torch.Generator(device="cuda").manual_seed(1)
    lin_w = torch.randn(N_CLASSES, C_OUT * W, device="cuda", generator=g) / (C_OUT * W) ** 0.5
    lin_b = torch.randn(N_CLASSES, device="cuda", generator=g) * 0.1
    args = [p[n] for n in ("weight", "bias", "bn_weight", "bn_bias", "bn_running_mean", "bn_running_var")]

    def run(x, ring, pos):
        if impl == "fused":
            return ksl.dilated_step_logits(x, ring, pos, *args, lin_w, lin_b, dilation=D, stride=S)
        return F.linear(ks.dilated_step(x, ring, pos, *args, dilation=D, stride=S), lin_w, lin_b)

    capacity = (K - 1) * D + 16
    ring = torch.randn(streams, capacity, C, device="cuda")
    with TF32(False), torch.inference_mode():
        small = torch.randn(2, frames, C, device="cuda")
        got = ksl.dilated_step_logits(small, ring[:2].clone(), 5, *args, lin_w, lin_b, dilation=D, stride=S)
        want = ksl.dilated_step_logits_ref(small, ring[:2].clone(), 5, *args, lin_w, lin_b, dilation=D, stride=S)
        assert float(((got - want).abs() / (1e-5 + 1e-4 * want.abs())).max()) <= 1.0
        # The step's own memory: what it allocates beyond the ring and its input (an out-of-memory
        # here is a skip that names the case: benchmarks/conftest.py).
        x = torch.randn(streams, frames, C, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(x, ring, 0)
        torch.cuda.synchronize()
        peak_gb = (torch.cuda.max_memory_allocated() - base) / 1e9
        del x
    pos = {"write": 0}

    def setup():
        x = torch.randn(streams, frames, C, device="cuda")
        torch.cuda.synchronize()
        return (x,), {}

    def step(x):
        with torch.inference_mode():
            y = run(x, ring, pos["write"])
        pos["write"] = (pos["write"] + frames) % capacity
        torch.cuda.synchronize()
        return y

    with TF32(False):
        measure(benchmark, step, setup, budget_s=2, min_rounds=5, max_rounds=2000, warmup_rounds=3)
    record(benchmark, DIL_STEP_LOGITS, f"{impl} x{streams} n{frames}", impl=impl, streams=streams,
           frames_per_step=frames, classes=N_CLASSES, peak_step_memory_gb=peak_gb,
           device=torch.cuda.get_device_name(),
           derive=lambda t: {"us_per_step": 1e6 * t, "us_per_frame": 1e6 * t / (frames * streams),
                             "real_time_factor": t / (frames * HOP_S)})
