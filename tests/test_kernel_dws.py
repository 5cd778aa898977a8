"""The fused DWS-block kernel (kernels/dws_block.py) against autograd through its stock-torch twin.

Runs on CPU under the Triton interpreter on tiny shapes (odd sizes, F not a multiple of the pool,
both block kinds: C_in = 1 with a depth multiplier, and C_in = C true depthwise; C = 20 spans two
16-channel tiles). The interpreter runs programs one after another in true fp32, so these tests
cannot show races or TF32 error: the kernels must still be run compiled on a GPU.

Tolerances: fp32 follows the parity rule, |a - b| <= 1e-5 + 1e-4 |b| elementwise (TF32 off).
fp16 (kernel on fp16 tensors vs the fp32 reference on the same fp16 values upcast):
|a - b| <= 5e-3 max|b| + 5e-3 |b|; torch's own fp16 composition is off by about 1e-3 max|b| here.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from interpreted_kernels import import_interpreted  # tests/ is on sys.path (not a package)

kd, = import_interpreted("kernels.dws_block")

from rtsed.models.model import build_model  # noqa: E402

PARAMS = ("dw_weight", "dw_bias", "bn1_weight", "bn1_bias", "bn1_running_mean", "bn1_running_var",
          "pw_weight", "pw_bias", "bn2_weight", "bn2_bias", "bn2_running_mean", "bn2_running_var")
RUNNING = {"bn1_running_mean", "bn1_running_var", "bn2_running_mean", "bn2_running_var"}

# Kernels run on CPU tensors under the interpreter, with TF32 off (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("interpreter_no_tf32")

# (C_in, C, T, F, P): F mod P = 2, 2, 1, 0, 0 (floor pooling drops the remainder); C_in = 2, C = 6
# is a grouped conv with depth multiplier 3 (not used by the models, supported by the kernel)
SHAPES = [(1, 8, 5, 10, 4), (6, 6, 5, 11, 3), (2, 6, 4, 9, 2), (1, 20, 3, 9, 3), (20, 20, 3, 8, 2)]
FP16_SHAPES = [SHAPES[0], SHAPES[1]]


def _params(c_in: int, c: int, seed: int, k: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    p = dict(dw_weight=rnd(c, 1, k, k, scale=0.3), dw_bias=rnd(c, scale=0.1),
             bn1_weight=1 + rnd(c, scale=0.3), bn1_bias=rnd(c, scale=0.1),
             bn1_running_mean=rnd(c, scale=0.2), bn1_running_var=0.5 + torch.rand(c, generator=g),
             pw_weight=rnd(c, c, 1, 1, scale=0.4), pw_bias=rnd(c, scale=0.1),
             bn2_weight=1 + rnd(c, scale=0.3), bn2_bias=rnd(c, scale=0.1),
             bn2_running_mean=0.3 + rnd(c, scale=0.1), bn2_running_var=0.5 + torch.rand(c, generator=g))
    p["bn2_weight"][0] = -p["bn2_weight"][0].abs()  # a negative BN2 scale: the max-pool picks min relu(p)
    return p


def _run(fn, x, params, *, pool, training, seed=1):
    """Forward, a random-cotangent backward; returns (out, grads by name, running stats after)."""
    params = {k: v.clone().requires_grad_(k not in RUNNING) for k, v in params.items()}
    x = x.clone().requires_grad_()
    out = fn(x, *(params[k] for k in PARAMS), pool=pool, training=training)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    (out * cotangent).sum().backward()
    grads = {"x": x.grad, **{k: v.grad for k, v in params.items() if k not in RUNNING}}
    return out.detach(), grads, {k: params[k].detach() for k in RUNNING}


def assert_parity(actual, expected, name, atol=1e-5, rtol=1e-4):
    assert actual.shape == expected.shape, name
    err = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{name}: max |a - b| = {err.max().item():.3g} ({worst:.2f} x the bound)"


def _case(shape, dtype, training, seed):
    c_in, c, t, f, pool = shape
    x = torch.randn(2, c_in, t + 4, f, generator=torch.Generator().manual_seed(seed + 100))
    params = _params(c_in, c, seed)
    if dtype == torch.float16:  # the reference sees exactly the fp16 values, upcast
        x, params = x.half(), {k: v.half() for k, v in params.items()}
    ref_x, ref_params = x.float(), {k: v.float() for k, v in params.items()}
    got = _run(kd.dws_block, x, params, pool=pool, training=training)
    want = _run(kd.dws_block_ref, ref_x, ref_params, pool=pool, training=training)
    return got, want


def _compare(got, want, dtype):
    (out, grads, stats), (ref_out, ref_grads, ref_stats) = got, want
    assert out.dtype == dtype
    pairs = [("out", out, ref_out)] + [(f"grad {k}", grads[k], ref_grads[k]) for k in ref_grads]
    pairs += [(k, stats[k], ref_stats[k]) for k in RUNNING]
    for name, a, b in pairs:
        assert a is not None and a.dtype == dtype, name
        if dtype == torch.float32:
            assert_parity(a, b, name)
        else:
            assert_parity(a.float(), b, name, atol=5e-3 * b.abs().max().item(), rtol=5e-3)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "cin{}_c{}_t{}_f{}_p{}".format(*s))
def test_forward_and_grads_fp32(shape, training):
    """Output, every gradient (x, depthwise w/b, BN1 w/b, pointwise w/b, BN2 w/b) and the running
    statistics (updated in train mode, untouched in eval mode) against the reference."""
    got, want = _case(shape, torch.float32, training, seed=sum(shape))
    _compare(got, want, torch.float32)
    if not training:
        _, _, stats = got
        params = _params(shape[0], shape[1], seed=sum(shape))
        for k in RUNNING:
            assert torch.equal(stats[k], params[k]), k


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", FP16_SHAPES, ids=lambda s: "cin{}_c{}_t{}_f{}_p{}".format(*s))
def test_forward_and_grads_fp16(shape, training):
    got, want = _case(shape, torch.float16, training, seed=sum(shape) + 7)
    _compare(got, want, torch.float16)


def test_inference_path_matches(monkeypatch):
    """Without autograd (no_grad, inference_mode, or no input needing a gradient) the forward kernel
    skips the argmax stores; same output."""
    launched = []
    kernel = kd._dws_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["STORE_ARGMAX"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kd, "_dws_fwd_kernel", Spy())
    x = torch.randn(2, 1, 8, 10)
    params = _params(1, 8, seed=3)
    args = [params[k] for k in PARAMS]
    ref = kd.dws_block_ref(x, *args, pool=4, training=False)
    trainable = [a.clone().requires_grad_(k not in RUNNING) for k, a in zip(PARAMS, args)]
    with torch.inference_mode():
        assert_parity(kd.dws_block(x, *trainable, pool=4, training=False), ref, "inference_mode out")
    with torch.no_grad():
        assert_parity(kd.dws_block(x, *trainable, pool=4, training=False), ref, "no_grad out")
    assert_parity(kd.dws_block(x, *args, pool=4, training=False), ref, "constant-input out")
    assert launched == [False, False, False]


def test_negative_bn_scale_is_a_min_pool():
    """With BN2's scale negative on a channel the pooled output is BN2(min over the window of relu(p))."""
    x = torch.randn(1, 1, 7, 8)
    params = _params(1, 4, seed=5)
    params["bn2_weight"] = -params["bn2_weight"].abs()
    args = [params[k] for k in PARAMS]
    with torch.no_grad():
        out = kd.dws_block(x, *args, pool=4, training=False)
        ref = kd.dws_block_ref(x, *args, pool=4, training=False)
    assert_parity(out, ref, "out")


def _dws_model(channels: int):
    return build_model("dws", channels=channels, n_classes=3)


def test_dispatch_in_a_model_eval_and_one_training_step(monkeypatch, channels=6):
    """RTSED_KERNELS=triton through rtsed.ops in a tiny dws model (all three blocks: 1 -> C with
    pool 5, C -> C with pools 4 and 2) equals RTSED_KERNELS=ref: eval logits, then one training
    step (dropout on, same seed) in logits, loss, every gradient, SGD-updated weights and BN
    buffers. SGD, not Adam: Adam's first step is lr * sign(grad) and turns rounding noise in
    near-zero gradients into full-size steps."""
    calls = []
    launch = kd.dws_block
    monkeypatch.setattr(kd, "dws_block", lambda x, *a, **k: calls.append(x.shape) or launch(x, *a, **k))
    torch.manual_seed(0)
    base = _dws_model(channels)
    x = torch.randn(2, 6, 40)
    y = torch.randint(0, 2, (2, 6, 3)).float()
    results = {}
    for backend in ("ref", "triton"):
        monkeypatch.setenv("RTSED_KERNELS", backend)
        model = _dws_model(channels)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            eval_logits = model.eval()(x)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(123)  # the same Dropout2d masks on both sides
        logits = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad()
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
        results[backend] = eval_logits, logits.detach(), loss.detach(), grads, model.state_dict()
    assert len(calls) == 6  # 3 blocks, eval + train, all through the kernel
    (e_ref, l_ref, loss_ref, g_ref, s_ref), (e_tri, l_tri, loss_tri, g_tri, s_tri) = results["ref"], results["triton"]
    assert_parity(e_tri, e_ref, "eval logits")
    assert_parity(l_tri, l_ref, "train logits")
    assert_parity(loss_tri, loss_ref, "loss")
    for k in g_ref:
        assert_parity(g_tri[k], g_ref[k], f"grad {k}")
    for k in s_ref:
        if s_ref[k].is_floating_point():
            assert_parity(s_tri[k], s_ref[k], f"state {k}")
        else:
            assert torch.equal(s_tri[k], s_ref[k]), k  # num_batches_tracked


def test_layer_entry_equals_the_reference_twin(monkeypatch):
    """The block through rtsed.ops on the kernel (RTSED_KERNELS=triton: the layer's tensors, the
    launcher, then Dropout2d) == block.valid_time_ref(x) in train mode: Dropout2d
    included (same seed), running stats and num_batches_tracked updated alike."""
    monkeypatch.setenv("RTSED_KERNELS", "triton")
    block = _dws_model(8).blocks[1].train()
    twin = copy.deepcopy(block)
    x = torch.randn(2, 8, 7, 8)
    torch.manual_seed(7)
    ref = twin.valid_time_ref(x)
    torch.manual_seed(7)
    out = block.valid_time(x)
    assert_parity(out, ref.detach(), "out")
    for name, buf in twin.named_buffers():
        if buf.is_floating_point():
            assert_parity(block.get_buffer(name), buf, name)
        else:
            assert torch.equal(block.get_buffer(name), buf), name


_GPU_PARITY_SCRIPT = r"""
import sys, torch
import kernels.dws_block as kd
assert not kd._INTERPRETED
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
dev = "cuda"
names = %(params)r
running = %(running)r
worst_all = 0.0
for c_in, freq, pool in ((1, 40, 5), (256, 8, 4)):
    for training in (False, True):
        g = torch.Generator().manual_seed(0)
        c = 256
        p = dict(dw_weight=torch.randn(c, 1, 5, 5, generator=g) * 0.3, dw_bias=torch.randn(c, generator=g) * 0.1,
                 bn1_weight=1 + 0.3 * torch.randn(c, generator=g), bn1_bias=0.1 * torch.randn(c, generator=g),
                 bn1_running_mean=0.2 * torch.randn(c, generator=g), bn1_running_var=0.5 + torch.rand(c, generator=g),
                 pw_weight=torch.randn(c, c, 1, 1, generator=g) / 16, pw_bias=0.1 * torch.randn(c, generator=g),
                 bn2_weight=1 + 0.3 * torch.randn(c, generator=g), bn2_bias=0.1 * torch.randn(c, generator=g),
                 bn2_running_mean=0.3 + 0.1 * torch.randn(c, generator=g),
                 bn2_running_var=0.5 + torch.rand(c, generator=g))
        p["bn2_weight"][::7] *= -1
        x0 = torch.randn(2, c_in, 3 + 4, freq, generator=g)
        cot = None
        res = []
        for fn, dtype in ((kd.dws_block, torch.float32), (kd.dws_block_ref, torch.float64),
                          (kd.dws_block_ref, torch.float32)):
            q = {k: v.to(dev, dtype, copy=True).requires_grad_(k not in running) for k, v in p.items()}
            x = x0.to(dev, dtype, copy=True).requires_grad_()
            out = fn(x, *(q[k] for k in names), pool=pool, training=training)
            if cot is None:
                cot = torch.randn(out.shape, generator=g).to(dev)
            (out * cot.to(dtype)).sum().backward()
            res.append([("out", out), ("x", x.grad)] + [(k, q[k].grad if k not in running else q[k]) for k in names])
        for (name, a), (_, b), (_, c32) in zip(*res):
            ratio = lambda v: ((v.double() - b).abs() / (1e-5 + 1e-4 * b.abs())).max().item()
            worst = ratio(a)
            worst_all = max(worst_all, worst)
            print(c_in, training, name, "kernel: max|a-b| %%.3g, parity ratio %%.3f; cuDNN fp32: %%.3f"
                  %% ((a.double() - b).abs().max().item(), worst, ratio(c32)))
sys.exit(0 if worst_all <= 1.0 else 1)
""" % {"params": PARAMS, "running": sorted(RUNNING)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels)")
def test_compiled_on_gpu_matches_reference():
    """The compiled kernels (not the interpreter: a fresh process without TRITON_INTERPRET) at the
    real channel count, 256, on both block kinds, eval and train, output and every gradient, within
    the fp32 parity rule of the fp64 reference, TF32 off. Against fp64, not the fp32 composition:
    at C = 256 the fp32 reference itself sits at 0.95 of the bound from the exact pointwise-weight
    gradient (interpreter run on CPU: kernel 0.60, so kernel vs fp32 reference reached 1.34)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _GPU_PARITY_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
