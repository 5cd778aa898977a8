"""kernels/dilated_step_logits.py (f_dil's ring step fused with the classifier) against its stock-torch twin.

Runs on CPU under the Triton interpreter on tiny shapes: several streams and classes, odd C,
W with unused trailing channels, S = 1..3, K = 3 and 5, d = 1..3, C_out spanning two 16-channel
tiles, frame counts that are not a multiple of the 16-frame tile, write positions that wrap the
ring; the W axis in one program and split over programs (partial logits summed), classes in
one block and in two. fp32 follows the parity rule (|a - b| <= 1e-5 + 1e-4 |b|, TF32 off); fp16
(kernel on fp16 tensors vs the fp32 reference on the same values upcast) |a - b| <= 5e-3
(max|b| + |b|). And the point of the fusion: no tensor of f_dil's output size (B n x C_out W) is
allocated during the step. The interpreter runs programs one after another in true fp32: the
kernel must still be run compiled on a GPU (benchmarks/test_gpu_models.py streams through it).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from interpreted_kernels import import_interpreted  # tests/ is on sys.path (not a package)

kd, ks, ksl = import_interpreted("kernels.dilated_temporal", "kernels.dilated_step", "kernels.dilated_step_logits")

from rtsed.models.model import build_model  # noqa: E402
from rtsed.stream.model_stream import ModelStream  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4
FP16 = 5e-3

# Kernels run on CPU tensors under the interpreter, with TF32 off (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("interpreter_no_tf32")


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, fp16: float | None = None) -> None:
    """Parity rule (fp32), or |a - b| <= fp16 (max|b| + |b|) for fp16 kernels vs the fp32 reference."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    a64, b64 = a.detach().double(), b.detach().double()
    assert torch.isfinite(a64).all(), f"{what}: non-finite values"
    err = (a64 - b64).abs()
    allowed = ATOL + RTOL * b64.abs() if fp16 is None else fp16 * (b64.abs().max() + b64.abs())
    worst = int((err / allowed).argmax())
    assert float((err / allowed).flatten()[worst]) <= 1.0, (
        f"{what}: {float(a64.flatten()[worst]):.8g} vs reference {float(b64.flatten()[worst]):.8g} at flat index "
        f"{worst}: |diff| {float(err.flatten()[worst]):.3g} > allowed {float(allowed.flatten()[worst]):.3g}")


def _operands(c: int, c_out: int, k: int, s: int, n_classes: int, seed: int) -> tuple[torch.Tensor, ...]:
    """conv weight and bias, BN affine and running statistics (random, a negative scale among
    them, so that a wrong fold shows), classifier weight (n_classes, C_out W) and bias."""
    g = torch.Generator().manual_seed(seed)
    width = (c - k) // s + 1
    bn_weight = torch.rand(c_out, generator=g) + 0.5
    bn_weight[0] = -bn_weight[0]
    return (torch.randn(c_out, 1, k, k, generator=g) * 0.3, torch.randn(c_out, generator=g) * 0.1, bn_weight,
            torch.randn(c_out, generator=g) * 0.5, torch.rand(c_out, generator=g) - 0.3,
            torch.rand(c_out, generator=g) * 1.5 + 0.25, torch.randn(n_classes, c_out * width, generator=g) * 0.1,
            torch.randn(n_classes, generator=g))


def _step(fn, frames, ring, write_pos, operands, d, s):
    return fn(frames, ring, write_pos, *operands, dilation=d, stride=s)


@pytest.fixture(params=[1, 1000], ids=["one-w-range", "w-split"])
def programs(request, monkeypatch):
    """The launcher's target program count: 1 runs each frame tile over all of W in one program;
    1000 splits W into one program per position (partial logits summed, bias added once)."""
    config = ksl._config(torch.empty(0), 16)
    monkeypatch.setattr(ksl, "_config", lambda ring, c_out: ksl._Config(
        config.block_f, config.block_co, request.param, config.warps, config.stages))
    return request.param


# (B, n, C, C_out, K, d, S, n_classes, write_pos): W = 5, 11, 5, 6; B n = 12, 2, 21, 4 frames
CASES = [(3, 4, 17, 20, 5, 2, 3, 7, 9), (2, 1, 13, 6, 3, 3, 2, 3, 0), (3, 7, 11, 5, 3, 1, 2, 16, 3),
         (4, 1, 12, 20, 3, 1, 2, 2, 5)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_n{}_C{}_Co{}_K{}_d{}_S{}_cls{}_pos{}".format(*c))
def test_fused_step_equals_step_then_classifier(case, programs):
    """Logits (B, n, n_classes) == the reference ring step then F.linear; the ring written alike."""
    b, n, c, c_out, k, d, s, n_classes, write_pos = case
    capacity = (k - 1) * d + n + 1
    operands = _operands(c, c_out, k, s, n_classes, seed=sum(case))
    g = torch.Generator().manual_seed(len(case) + n)
    ring, frames = torch.randn(b, capacity, c, generator=g), torch.randn(b, n, c, generator=g)
    ring_ref = ring.clone()
    got = _step(ksl.dilated_step_logits, frames, ring, write_pos % capacity, operands, d, s)
    want = _step(ksl.dilated_step_logits_ref, frames, ring_ref, write_pos % capacity, operands, d, s)
    assert got.dtype == torch.float32 and got.shape == (b, n, n_classes)
    assert_close(got, want, f"logits {case}")
    assert torch.equal(ring, ring_ref)


def test_classes_in_several_blocks(monkeypatch, programs):
    """More classes than one block holds: each class block recomputes the conv and writes its
    own columns (20 classes in blocks of 16)."""
    monkeypatch.setattr(ksl, "MAX_CLASS_BLOCK", 16)
    b, n, c, c_out, k, d, s, n_classes = 2, 3, 13, 6, 3, 2, 2, 20
    operands = _operands(c, c_out, k, s, n_classes, seed=3)
    ring = torch.randn(b, (k - 1) * d + n, c, generator=torch.Generator().manual_seed(4))
    frames = torch.randn(b, n, c, generator=torch.Generator().manual_seed(5))
    got = _step(ksl.dilated_step_logits, frames, ring.clone(), 2, operands, d, s)
    want = _step(ksl.dilated_step_logits_ref, frames, ring.clone(), 2, operands, d, s)
    assert_close(got, want, "logits, two class blocks")


def test_fp16_step_against_the_fp32_reference():
    b, n, c, c_out, k, d, s, n_classes = 3, 2, 13, 20, 3, 2, 2, 5
    operands = [t.half() for t in _operands(c, c_out, k, s, n_classes, seed=6)]
    ring = torch.randn(b, (k - 1) * d + n, c, generator=torch.Generator().manual_seed(7)).half()
    frames = torch.randn(b, n, c, generator=torch.Generator().manual_seed(8)).half()
    got = _step(ksl.dilated_step_logits, frames, ring.clone(), 1, operands, d, s)
    want = _step(ksl.dilated_step_logits_ref, frames.float(), ring.float(), 1, [t.float() for t in operands], d, s)
    assert got.dtype == torch.float16
    assert_close(got, want, "fp16 logits", fp16=FP16)


class _Allocations(TorchDispatchMode):
    """Records the bytes of every tensor an aten op returns (allocations and views alike, the
    interpreter's byte views of the kernel's arguments included: an over-count, which only makes
    the check below stricter)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel() * t.element_size()))
        return out


def test_no_tensor_of_f_dil_output_size_is_allocated(programs):
    """The point of the fusion: f_dil's output for the step, B n x C_out W values, is never
    materialised; the largest tensor made is no bigger than the ring, an operand (views of the
    classifier weight) or the partial logits. The same recorder on the unfused reference step
    finds that tensor (the check can fail)."""
    b, n, c, c_out, k, d, s, n_classes = 4, 4, 17, 20, 3, 1, 1, 5  # W = 15: 300 values per frame
    operands = _operands(c, c_out, k, s, n_classes, seed=9)
    ring = torch.randn(b, (k - 1) * d + n, c, generator=torch.Generator().manual_seed(10))
    frames = torch.randn(b, n, c, generator=torch.Generator().manual_seed(11))
    f_dil_output = b * n * c_out * ((c - k) // s + 1) * 4  # bytes, fp32
    partials = b * n * n_classes * ((c - k) // s + 1) * 4  # at most one split per w
    bound = max(ring.numel() * 4, partials, *(t.numel() * 4 for t in operands))
    assert bound < f_dil_output

    with _Allocations() as fused:
        ksl.dilated_step_logits(frames, ring.clone(), 0, *operands, dilation=d, stride=s)
    biggest = max(fused.sizes, key=lambda x: x[1])
    assert biggest[1] <= bound, f"the fused step made a tensor of {biggest[1]} bytes ({biggest[0]})"

    with _Allocations() as unfused:
        ksl.dilated_step_logits_ref(frames, ring.clone(), 0, *operands, dilation=d, stride=s)
    assert max(size for _, size in unfused.sizes) >= f_dil_output


def test_bad_classifier_is_refused_with_the_fix_named():
    c, c_out, k, d, s = 13, 6, 3, 2, 2
    operands = list(_operands(c, c_out, k, s, 4, seed=12))
    ring = torch.zeros(1, (k - 1) * d + 1, c)
    operands[6] = operands[6][:, :-1]  # a classifier for another width
    with pytest.raises(ValueError, match=r"\(n_classes, C_out \* W\).*nn.Linear that follows f_dil"):
        _step(ksl.dilated_step_logits, torch.zeros(1, 1, c), ring, 0, operands, d, s)


def test_streaming_model_through_the_fused_step(monkeypatch):
    """ModelStream over 3 streams of a tiny "same"-padded dil model with 5 classes under
    RTSED_KERNELS=triton (f_dil and the classifier through kernels.dilated_step_logits, nothing
    through the unfused ring step) == the same stream under RTSED_KERNELS=ref, step by step,
    over several wraps of the ring."""
    fused_calls, unfused_calls = [], []
    for module, name, calls in ((ksl, "dilated_step_logits", fused_calls), (ks, "dilated_step", unfused_calls)):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, calls=calls, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    model = build_model("dil_3_2", channels=16, n_classes=5).eval()
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) - 0.3)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.25)
                bn.weight.copy_(torch.randn(bn.num_features, generator=g))
    streams = {backend: ModelStream(copy.deepcopy(model), batch_size=3, max_step_frames=3) for backend in ("triton", "ref")}
    x = torch.randn(3, 17, model.config.n_mels, generator=g)
    for i in range(0, 17, 3):
        out = {}
        for backend, stream in streams.items():
            monkeypatch.setenv("RTSED_KERNELS", backend)
            with torch.no_grad():
                out[backend] = stream.step(x[:, i:i + 3])
        assert_close(out["triton"].logits, out["ref"].logits, f"streamed logits at frame {i}")
        assert torch.equal(out["triton"].valid, out["ref"].valid)
    assert len(fused_calls) == 6 and not unfused_calls


_GPU_PARITY_SCRIPT = r"""
import sys, torch
import kernels.dilated_step as ks
import kernels.dilated_step_logits as ksl
assert not ksl._INTERPRETED
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
dev = "cuda"
C, C_OUT, K, D, S, CLASSES = 256, 256, 7, 10, 3, 16  # dnd_7_10's f_dil and classifier
W = (C - K) // S + 1
g = torch.Generator().manual_seed(0)
ops = [torch.randn(C_OUT, 1, K, K, generator=g) / K, 0.1 * torch.randn(C_OUT, generator=g),
       1 + 0.3 * torch.randn(C_OUT, generator=g), 0.1 * torch.randn(C_OUT, generator=g),
       0.3 + 0.1 * torch.randn(C_OUT, generator=g), 0.5 + torch.rand(C_OUT, generator=g),
       torch.randn(CLASSES, C_OUT * W, generator=g) / (C_OUT * W) ** 0.5, 0.1 * torch.randn(CLASSES, generator=g)]
ops[2][::7] *= -1
worst_all = 0.0
# 1 and 3 streams split W over programs; 300 streams x 4 frames fill the GPU with frame tiles.
for streams, n, pos in ((1, 1, 0), (3, 5, 63), (300, 4, 30)):
    cap = (K - 1) * D + n + 3
    ring0 = torch.randn(streams, cap, C, generator=g)
    frames0 = torch.randn(streams, n, C, generator=g)
    want = ksl.dilated_step_logits_ref(frames0.to(dev, torch.float64), ring0.to(dev, torch.float64), pos,
                                       *(t.to(dev, torch.float64) for t in ops), dilation=D, stride=S)
    for dtype, fn, name in ((torch.float32, ksl.dilated_step_logits, "fused fp32"),
                            (torch.float32, lambda *a, **k: torch.nn.functional.linear(
                                ks.dilated_step(*a[:9], **k), a[9], a[10]), "step then linear fp32"),
                            (torch.float16, ksl.dilated_step_logits, "fused fp16")):
        ring = ring0.to(dev, dtype)
        got = fn(frames0.to(dev, dtype), ring, pos, *(t.to(dev, dtype) for t in ops), dilation=D, stride=S)
        if dtype == torch.float32:
            ratio = ((got.double() - want).abs() / (1e-5 + 1e-4 * want.abs())).max().item()
        else:
            ratio = ((got.double() - want).abs() / (5e-3 * (want.abs().max() + want.abs()))).max().item()
        if name.startswith("fused"):
            worst_all = max(worst_all, ratio)
        print(streams, n, name, "max|a-b| %.3g, ratio to the allowed error %.3f" % ((got.double() - want).abs().max().item(), ratio))
sys.exit(0 if worst_all <= 1.0 else 1)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels)")
def test_compiled_on_gpu_matches_fp64_reference():
    """The compiled kernel (a fresh process without TRITON_INTERPRET) at dnd_7_10's shapes, the W
    axis split and not, against the fp64 reference: fp32 (TF32 off) within the parity rule, fp16
    within 5e-3 (max|b| + |b|); the unfused fp32 step's error is printed beside it."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _GPU_PARITY_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
