"""f_dil's kernels (kernels/dilated_temporal.py, kernels/dilated_step.py) against their stock-torch twins
(the ring step fused with the classifier, kernels/dilated_step_logits.py: tests/test_kernel_step_logits.py).

Runs on CPU under the Triton interpreter on tiny shapes: odd C, W with unused trailing channels
(C - K not a multiple of S), S = 1..3, K = 3 and 5, d = 1..3, C_out = 20 spanning two 16-channel
tiles, row counts that are not multiples of the 32-row tile and split over two programs (so the
cross-program merges of BN statistics and weight-gradient partials run). The interpreter runs
programs one after another in true fp32, so these tests cannot show races or TF32 error: the
kernels must still be run compiled on a GPU (benchmarks/test_kernels_dilated.py checks parity
there before timing).

Tolerances: fp32 follows the parity rule, |a - b| <= 1e-5 + 1e-4 |b| elementwise (TF32 off), on
outputs, running statistics and every gradient. fp16 (kernel on fp16 tensors vs the fp32
reference on the same fp16 values upcast): |a - b| <= 5e-3 max|b| + 5e-3 |b| for outputs and
1e-2 max|b| + 1e-2 |b| for gradients (the weight gradient's dot takes dp rounded to fp16, as
cuDNN's fp16 backward does). The largest error seen per check is printed at the end (pytest -s).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from interpreted_kernels import import_interpreted  # tests/ is on sys.path (not a package)

kd, ks, ksl = import_interpreted("kernels.dilated_temporal", "kernels.dilated_step", "kernels.dilated_step_logits")

from rtsed import ops  # noqa: E402
from rtsed.backends import dispatch  # noqa: E402
from rtsed.models.layers import DilatedTemporal  # noqa: E402
from rtsed.models.model import build_model  # noqa: E402
from rtsed.stream.model_stream import ModelStream  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4
FP16_OUT, FP16_GRAD = 5e-3, 1e-2
PARAMS = ("weight", "bias", "bn_weight", "bn_bias", "bn_running_mean", "bn_running_var")
GRADS = ("x", "weight", "bias", "bn_weight", "bn_bias")

# Kernels run on CPU tensors under the interpreter, with TF32 off (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("interpreter_no_tf32")

# (B, T, C, C_out, K, d, S): W = (C - K) // S + 1 = 6, 11, 5, 6, 3; rows B T W = 60, 154, 45, 72, 12
SHAPES = [(2, 5, 13, 6, 3, 2, 2), (2, 7, 11, 5, 3, 1, 1), (1, 9, 17, 8, 5, 3, 3), (2, 6, 15, 20, 5, 1, 2),
          (1, 4, 12, 4, 5, 2, 3)]
FP16_SHAPES = [SHAPES[0], SHAPES[2]]

_WORST: dict[str, tuple[float, float]] = {}  # check -> (largest |a - b|, largest error / allowed)


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    print("\n[test_kernel_dilated] largest error per check: |a - b| (fraction of the tolerance)")
    for what, (err, ratio) in sorted(_WORST.items()):
        print(f"  {what:28s} {err:.3g} ({ratio:.3g})")


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, *, fp16: float | None = None, check: str = "") -> None:
    """Parity rule (fp32), or |a - b| <= fp16 (max|b| + |b|) for fp16 kernels vs the fp32 reference."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    a64, b64 = a.detach().double(), b.detach().double()
    assert torch.isfinite(a64).all(), f"{what}: non-finite values"
    err = (a64 - b64).abs()
    if fp16 is None:
        allowed = ATOL + RTOL * b64.abs()
    else:
        allowed = fp16 * (b64.abs().max() + b64.abs())
    ratio = err / allowed
    worst = int(ratio.argmax())
    key = check or what
    old = _WORST.get(key, (0.0, 0.0))
    _WORST[key] = (max(old[0], float(err.max())), max(old[1], float(ratio.max())))
    assert float(ratio.flatten()[worst]) <= 1.0, (
        f"{what}: {float(a64.flatten()[worst]):.8g} vs reference {float(b64.flatten()[worst]):.8g} at flat "
        f"index {worst}: |diff| {float(err.flatten()[worst]):.3g} > allowed {float(allowed.flatten()[worst]):.3g} "
        f"({int((ratio > 1).sum())} of {ratio.numel()} elements out of tolerance)")


def _params(c_out: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    p = dict(weight=rnd(c_out, 1, k, k, scale=0.3), bias=rnd(c_out, scale=0.1),
             bn_weight=1 + rnd(c_out, scale=0.3), bn_bias=rnd(c_out, scale=0.1),
             bn_running_mean=0.3 + rnd(c_out, scale=0.1), bn_running_var=0.5 + torch.rand(c_out, generator=g))
    p["bn_weight"][0] = -p["bn_weight"][0].abs()  # a negative BN scale
    return p


def _input(b: int, t: int, c: int, k: int, d: int, seed: int) -> torch.Tensor:
    """(B, 1, T + (K - 1) d, C), with the zero rows of "same" padding at both ends."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, t, c, generator=g)
    pad = (k - 1) * d
    return F.pad(x, (0, 0, pad // 2, pad - pad // 2))


def _run(fn, x, params, *, dilation, stride, training, backward=True, seed=1):
    """Forward and a random-cotangent backward; returns (out, grads by name, running stats after)."""
    params = {k: v.clone().requires_grad_(backward and not k.startswith("bn_running")) for k, v in params.items()}
    x = x.clone().requires_grad_(backward)
    out = fn(x, *(params[k] for k in PARAMS), dilation=dilation, stride=stride, training=training, momentum=0.1)
    grads = {}
    if backward:
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
        (out * cotangent).sum().backward()
        grads = {"x": x.grad, **{k: params[k].grad for k in GRADS[1:]}}
    return out, grads, (params["bn_running_mean"], params["bn_running_var"])


# ----------------------------------------------------------------------------------------------
# dilated_temporal: forward (eval and train, running statistics) and gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_C{}_Co{}_K{}_d{}_S{}".format(*s))
def test_forward_and_gradients_fp32(shape, training):
    b, t, c, c_out, k, d, s = shape
    x = _input(b, t, c, k, d, seed=sum(shape))
    params = _params(c_out, k, seed=c_out + k)
    out, grads, running = _run(kd.dilated_temporal, x, params, dilation=d, stride=s, training=training)
    ref, ref_grads, ref_running = _run(kd.dilated_temporal_ref, x, params, dilation=d, stride=s, training=training)
    mode = "train" if training else "eval"
    assert out.dtype == torch.float32 and out.shape == (b, c_out, t, (c - k) // s + 1)
    assert_close(out, ref, f"{mode} output {shape}", check=f"fp32 {mode} output")
    for name, got, want in zip(("running_mean", "running_var"), running, ref_running):
        assert_close(got, want, f"{mode} {name} {shape}", check=f"fp32 {mode} running stats")
    for name in GRADS:
        assert grads[name] is not None, name
        assert grads[name].dtype == torch.float32
        assert_close(grads[name], ref_grads[name], f"{mode} grad {name} {shape}", check=f"fp32 {mode} grad {name}")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", FP16_SHAPES, ids=lambda s: "B{}_T{}_C{}_Co{}_K{}_d{}_S{}".format(*s))
def test_forward_and_gradients_fp16(shape, training):
    b, t, c, c_out, k, d, s = shape
    x16 = _input(b, t, c, k, d, seed=sum(shape)).half()
    p16 = {name: v.half() for name, v in _params(c_out, k, seed=c_out + k).items()}
    out, grads, running = _run(kd.dilated_temporal, x16, p16, dilation=d, stride=s, training=training)
    ref, ref_grads, ref_running = _run(kd.dilated_temporal_ref, x16.float(), {n: v.float() for n, v in p16.items()},
                                       dilation=d, stride=s, training=training)
    mode = "train" if training else "eval"
    assert out.dtype == torch.float16
    assert_close(out, ref, f"fp16 {mode} output {shape}", fp16=FP16_OUT, check=f"fp16 {mode} output")
    for name, got, want in zip(("running_mean", "running_var"), running, ref_running):
        assert got.dtype == torch.float16
        assert_close(got, want, f"fp16 {mode} {name}", fp16=FP16_OUT, check=f"fp16 {mode} running stats")
    for name in GRADS:
        assert grads[name].dtype == torch.float16, name
        assert_close(grads[name], ref_grads[name], f"fp16 {mode} grad {name} {shape}", fp16=FP16_GRAD,
                     check=f"fp16 {mode} grads")


def test_only_the_needed_gradients():
    """Frozen parameters get no gradient and x alone still gets the right one (the passes that
    are not needed are skipped)."""
    b, t, c, c_out, k, d, s = SHAPES[0]
    x = _input(b, t, c, k, d, seed=3).requires_grad_()
    p = _params(c_out, k, seed=4)
    out = kd.dilated_temporal(x, *(p[n] for n in PARAMS), dilation=d, stride=s, training=True)
    xr = x.detach().clone().requires_grad_()
    ref = kd.dilated_temporal_ref(xr, *(p[n] for n in PARAMS), dilation=d, stride=s, training=True)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * cotangent).sum().backward()  # not out.square(): BN makes that gradient ~eps, all cancellation
    (ref * cotangent).sum().backward()
    assert_close(x.grad, xr.grad, "x-only grad", check="fp32 train grad x")


def test_layer_matches_conv_relu_bn_and_its_bookkeeping(monkeypatch):
    """The layer's op through the kernel (rtsed.ops.dilated_temporal under RTSED_KERNELS=triton)
    == layer.conv_relu_bn(x) over two training steps and an eval step, momentum 0.1 and None
    (cumulative average), num_batches_tracked included; the output is a (B, C_out, T, W) view
    whose flatten to (B, T, C_out W) is free."""
    b, t, c, k, d, s = 2, 6, 13, 3, 2, 2  # the layer's C_out is its C
    calls = _spy(monkeypatch, kd, "dilated_temporal")
    for momentum in (0.1, None):
        torch.manual_seed(0)
        layer = DilatedTemporal(c, k, d, s, right_pad=(k - 1) * d // 2)
        layer.bn.momentum = momentum
        ref_layer = copy.deepcopy(layer)
        for step, training in enumerate((True, True, False)):
            layer.train(training)
            ref_layer.train(training)
            x = _input(b, t, c, k, d, seed=10 + step)
            with dispatch.forced_backend("triton"):
                out = layer._conv_relu_bn(x, ops.dilated_temporal)
            ref = ref_layer.conv_relu_bn(x)
            assert_close(out, ref, f"layer step {step} momentum {momentum}", check="fp32 layer output")
            for name in ("running_mean", "running_var"):
                assert_close(getattr(layer.bn, name), getattr(ref_layer.bn, name), f"layer {name}",
                             check="fp32 layer running stats")
            assert int(layer.bn.num_batches_tracked) == int(ref_layer.bn.num_batches_tracked)
        assert out.shape == (b, c, t, (c - k) // s + 1)
        flat = DilatedTemporal._flatten(out)
        assert flat.data_ptr() == out.data_ptr()  # a view, no copy
    assert len(calls) == 6  # every step went through the kernel


def test_rejects_what_it_cannot_run():
    x = _input(1, 4, 11, 3, 1, seed=0)
    p = _params(4, 3, seed=0)
    with pytest.raises(TypeError, match="float32 or float16"):
        kd.dilated_temporal(x.double(), *(p[n].double() for n in PARAMS), dilation=1, stride=1, training=False)
    with pytest.raises(ValueError, match="receptive field"):
        kd.dilated_temporal(x[:, :, :2], *(p[n] for n in PARAMS), dilation=1, stride=1, training=False)
    with pytest.raises(ValueError, match="more than 1 value"):
        kd.dilated_temporal(x[:, :, :3, :3], *(p[n] for n in PARAMS), dilation=1, stride=1, training=True)


# ----------------------------------------------------------------------------------------------
# dilated_step: the streaming ring step against the offline layer
# ----------------------------------------------------------------------------------------------


def _randomize_bn(module: torch.nn.Module, seed: int) -> None:
    """Random running statistics and affine parameters in every BatchNorm (default ones would make
    the folded BN an identity up to eps, and hide a wrong fold)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.rand(n, generator=g) - 0.3)
                bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                bn.weight.copy_((torch.rand(n, generator=g) + 0.5) * torch.sign(torch.randn(n, generator=g)))
                bn.bias.copy_(torch.randn(n, generator=g) * 0.5)


def _eval_layer(c: int, k: int, d: int, s: int, seed: int, right_pad: int = 0) -> DilatedTemporal:
    g = torch.Generator().manual_seed(seed)
    layer = DilatedTemporal(c, k, d, s, right_pad=right_pad)
    with torch.no_grad():
        layer.conv.weight.copy_(torch.randn(layer.conv.weight.shape, generator=g) * 0.3)
        layer.conv.bias.copy_(torch.randn(layer.conv.bias.shape, generator=g) * 0.1)
    _randomize_bn(layer, seed)
    return layer.eval()


# (C, K, d, S, max_step, chunks): capacity (K - 1) d + max_step = 10, 7, 16 for 29, 31, 36 frames
STEP_CASES = [(13, 3, 3, 2, 4, [1, 4, 3, 2, 4, 4, 1, 1, 3, 4, 2]),
              (11, 3, 1, 1, 5, [5, 5, 1, 2, 5, 3, 5, 5]),
              (17, 5, 2, 3, 8, [8, 1, 7, 8, 3, 4, 5])]


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda cs: "C{}_K{}_d{}_S{}_step{}".format(*cs[:5]))
def test_step_equals_offline_with_wraparound(monkeypatch, case):
    """Ring steps (kernel) == the offline causal layer (reference), frame by frame, over several
    wraps of the ring; the ring contents and write position == the reference step's
    (rtsed.ops.dilated_step_ref, what RTSED_KERNELS=ref runs)."""
    monkeypatch.setenv("RTSED_KERNELS", "ref")  # the offline side: stock torch
    c, k, d, s, max_step, chunks = case
    layer = _eval_layer(c, k, d, s, seed=c)
    b, n_frames = 2, sum(chunks)
    frames = torch.randn(b, n_frames, c, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        offline = layer(frames.transpose(1, 2)[..., None])  # (B, T, C_out W), causal
        state = layer.init_state(b, max_step, frames.device, frames.dtype)
        ref_state = layer.init_state(b, max_step, frames.device, frames.dtype)
        assert state.frames.shape[1] < n_frames / 2  # wraps at least twice
        outs, pos = [], 0
        calls = _spy(monkeypatch, ks, "dilated_step")
        for n in chunks:
            h = frames[:, pos:pos + n].transpose(1, 2)[..., None]  # (B, C, n, 1) new CNN frames
            with dispatch.forced_backend("triton"):
                out = layer.step(h, state)
            with dispatch.forced_backend("ref"):
                ref = layer.step(h, ref_state)
            assert_close(out, ref, f"step at {pos}", check="fp32 step vs reference step")
            assert state.write_pos == ref_state.write_pos
            assert torch.equal(state.frames, ref_state.frames)
            outs.append(out)
            pos += n
        assert len(calls) == len(chunks)
    assert_close(torch.cat(outs, dim=1), offline, f"stream vs offline {case}", check="fp32 step vs offline")


def test_step_fp16_and_launcher_twin():
    """fp16 ring (kernel) vs the fp32 offline layer on the same values; and the launcher against
    dilated_step_ref with the same signature, written ring included."""
    c, k, d, s = 13, 3, 2, 2
    layer = _eval_layer(c, k, d, s, seed=1)
    frames = torch.randn(1, 12, c, generator=torch.Generator().manual_seed(2)).half()
    with torch.no_grad():
        offline = layer.conv_relu_bn(F.pad(frames.float()[:, None], (0, 0, (k - 1) * d, 0)))
        offline = DilatedTemporal._flatten(offline)
        layer16 = copy.deepcopy(layer).half()
        state = layer16.init_state(1, 5, frames.device, torch.float16)
        with dispatch.forced_backend("triton"):
            outs = [layer16.step(frames[:, i:i + 5].transpose(1, 2)[..., None], state) for i in range(0, 12, 5)]
    got = torch.cat(outs, dim=1)
    assert got.dtype == torch.float16
    assert_close(got, offline, "fp16 stream vs offline", fp16=FP16_OUT, check="fp16 step vs offline")

    args = (layer.conv.weight, layer.conv.bias, layer.bn.weight, layer.bn.bias, layer.bn.running_mean,
            layer.bn.running_var)
    ring = torch.randn(2, 9, c, generator=torch.Generator().manual_seed(3))
    ring_ref = ring.clone()
    new = torch.randn(2, 5, c, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = ks.dilated_step(new, ring, 7, *args, dilation=d, stride=s)  # wraps: slots 7, 8, 0, 1, 2
        want = ks.dilated_step_ref(new, ring_ref, 7, *args, dilation=d, stride=s)
    assert_close(got, want, "launcher vs dilated_step_ref", check="fp32 step vs reference step")
    assert torch.equal(ring, ring_ref)
    with pytest.raises(ValueError, match="do not fit"):
        ks.dilated_step(torch.zeros(2, 6, c), ring, 0, *args, dilation=d, stride=s)
    with pytest.raises(RuntimeError, match="eval mode"), dispatch.forced_backend("triton"):
        layer.train().step(new.transpose(1, 2)[..., None], layer.init_state(2, 5, new.device, new.dtype))


# ----------------------------------------------------------------------------------------------
# Dispatch through rtsed.ops in a tiny model
# ----------------------------------------------------------------------------------------------


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_dispatch_in_a_model_eval_and_one_training_step(monkeypatch):
    """RTSED_KERNELS=triton through rtsed.ops in a tiny dil model (f_dil: C = 16, K = 3, d = 2,
    S = 2, so W = 7) equals RTSED_KERNELS=ref: eval logits, then one training step (train-mode
    forward with dropout, BCE loss, backward, SGD step): loss, every gradient, the parameters
    after the step and the BN running statistics."""
    calls = _spy(monkeypatch, kd, "dilated_temporal")
    torch.manual_seed(0)
    base = build_model("dil_3_2", channels=16, n_classes=3)
    _randomize_bn(base, seed=11)
    x = torch.randn(2, 11, base.config.n_mels, generator=torch.Generator().manual_seed(1))
    y = (torch.rand(2, 11, 3, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    results = {}
    for backend in ("ref", "triton"):
        monkeypatch.setenv("RTSED_KERNELS", backend)
        assert dispatch.backend_for("dilated_temporal", x) == backend
        model = copy.deepcopy(base)
        with torch.no_grad():
            logits_eval = model.eval()(x)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(7)  # the same dropout masks on both sides
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        results[backend] = (logits_eval, loss.detach(), grads, copy.deepcopy(model.state_dict()))
    assert len(calls) == 2  # the eval and the training forward went through the kernel
    (l_ref, loss_ref, g_ref, s_ref), (l_tri, loss_tri, g_tri, s_tri) = results["ref"], results["triton"]
    assert_close(l_tri, l_ref, "model eval logits", check="fp32 model logits")
    assert_close(loss_tri, loss_ref, "model train loss", check="fp32 model logits")
    for name in g_ref:
        assert_close(g_tri[name], g_ref[name], f"model grad {name}", check="fp32 model grads")
    for name in s_ref:
        if s_ref[name].is_floating_point():
            assert_close(s_tri[name], s_ref[name], f"model state {name}", check="fp32 model state after step")
        else:
            assert torch.equal(s_tri[name], s_ref[name]), name


def test_dispatch_streaming_model(monkeypatch):
    """ModelStream over a tiny "same"-padded dil model with RTSED_KERNELS=triton (the ring step
    and the classifier through kernels.dilated_step_logits) equals the offline model under
    RTSED_KERNELS=ref, ring wraps included."""
    calls = _spy(monkeypatch, ksl, "dilated_step_logits")
    torch.manual_seed(0)
    model = build_model("dil_3_2", channels=16, n_classes=3).eval()
    _randomize_bn(model, seed=12)
    x = torch.randn(23, model.config.n_mels, generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv("RTSED_KERNELS", "ref")
    with torch.no_grad():
        offline = model(x[None])[0]
    monkeypatch.setenv("RTSED_KERNELS", "triton")
    stream = ModelStream(model, max_step_frames=3)  # ring of 4 + 3 frames
    outs = [stream.push(x[i:i + 5]) for i in range(0, 23, 5)]
    outs.append(stream.flush())
    assert calls
    assert_close(torch.cat(outs), offline, "streamed logits", check="fp32 model stream")
