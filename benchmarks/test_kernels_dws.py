"""The fused DWS block (kernels/dws_block.py, Triton) against cuDNN (stock torch ops), on a GPU.

Run with ``pytest benchmarks/test_kernels_dws.py --benchmark-only`` on a CUDA machine; it skips
without CUDA or triton, or if TRITON_INTERPRET is set (that would time the interpreter).

Shapes, the paper's batch of 16 x 1024 frames, C = 256 channels, 5 x 5 kernels:

- block 1: x (16, 1, 1028, 40) -> (16, 256, 1024, 8), a 1 -> 256 conv, pool 5;
- block 2: x (16, 256, 1028, 8) -> (16, 256, 1024, 2), true depthwise, pool 4.

Implementations: ``triton`` (``dws_block``, NCHW input), ``cudnn_nchw`` and ``cudnn_channels_last``
(``dws_block_ref``: conv2d -> leaky_relu -> batch_norm -> conv2d -> relu -> batch_norm ->
max_pool2d; input and weights in that memory format, converted with ``.to(memory_format=...)``
as docs/fast-paths.md advises). Dropout is left out of all three (it is the same torch op either way).
Modes: ``inference`` (eval-mode BatchNorm, torch.inference_mode) and ``fwd_bwd`` (train-mode
BatchNorm with running-stat updates, forward then backward of a fixed random cotangent; every
parameter needs its gradient, the input needs one for block 2 only, as in the model). Dtypes:
fp32 with torch's default TF32 settings (cuDNN convs use TF32 by default; the kernel follows
torch.backends.cudnn.allow_tf32) and fp16.

extra_info: ms per call, effective GB/s over the compulsory traffic (input read and pooled output
written; for fwd_bwd also the output gradient read and the input gradient written: a lower bound
on the bytes any implementation moves), TFLOP/s over the model's multiply-accumulates (forward
MACs; x3 for fwd_bwd), and for ``triton`` the ratios cuDNN time / Triton time
(``speedup_vs_cudnn_nchw``, ``speedup_vs_cudnn_channels_last``; target >= 1.5 for fwd_bwd),
taken from the cuDNN cases of the same session (they run first). Every round synchronises the
GPU at its end; inputs are made fresh, untimed, in each round's setup.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._report import RESULTS, measure, record

if not torch.cuda.is_available():
    pytest.skip("the DWS kernel benchmark needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

import kernels.dws_block as kd  # noqa: E402

if kd._INTERPRETED:
    pytest.skip("TRITON_INTERPRET is set: this would time the interpreter", allow_module_level=True)

BATCH, FRAMES, CHANNELS, KERNEL = 16, 1024, 256, 5
BLOCKS = {"block1": dict(c_in=1, freq=40, pool=5), "block2": dict(c_in=CHANNELS, freq=8, pool=4)}
IMPLS = ("cudnn_nchw", "cudnn_channels_last", "triton")  # triton last: its ratios need the others
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
NAMES = ("dw_weight", "dw_bias", "bn1_weight", "bn1_bias", "bn1_running_mean", "bn1_running_var",
         "pw_weight", "pw_bias", "bn2_weight", "bn2_bias", "bn2_running_mean", "bn2_running_var")
RUNNING = ("bn1_running_mean", "bn1_running_var", "bn2_running_mean", "bn2_running_var")
CASES = [(block, mode, dtype, impl) for block in BLOCKS for mode in ("inference", "fwd_bwd")
         for dtype in DTYPES for impl in IMPLS]


def _params(c_in: int, dtype: torch.dtype, channels_last: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    c, k = CHANNELS, KERNEL
    p = dict(dw_weight=torch.randn(c, 1, k, k, generator=g) * 0.2, dw_bias=0.1 * torch.randn(c, generator=g),
             bn1_weight=1 + 0.2 * torch.randn(c, generator=g), bn1_bias=0.1 * torch.randn(c, generator=g),
             bn1_running_mean=0.1 * torch.randn(c, generator=g), bn1_running_var=0.5 + torch.rand(c, generator=g),
             pw_weight=torch.randn(c, c, 1, 1, generator=g) / 16, pw_bias=0.1 * torch.randn(c, generator=g),
             bn2_weight=1 + 0.2 * torch.randn(c, generator=g), bn2_bias=0.1 * torch.randn(c, generator=g),
             bn2_running_mean=0.3 + 0.1 * torch.randn(c, generator=g), bn2_running_var=0.5 + torch.rand(c, generator=g))
    out = {}
    for name, t in p.items():
        t = t.to("cuda", dtype)
        if channels_last and t.dim() == 4:
            t = t.to(memory_format=torch.channels_last)
        out[name] = t.requires_grad_(name not in RUNNING)
    return out


def _macs(freq: int) -> int:
    rows = BATCH * FRAMES * freq
    return rows * CHANNELS * KERNEL * KERNEL + rows * CHANNELS * CHANNELS  # depthwise + pointwise


@pytest.mark.parametrize("block, mode, dtype_name, impl", CASES,
                         ids=[f"{b}-{m}-{d}-{i}" for b, m, d, i in CASES])
def test_dws_block_gpu(benchmark, block, mode, dtype_name, impl):
    spec = BLOCKS[block]
    c_in, freq, pool = spec["c_in"], spec["freq"], spec["pool"]
    dtype = DTYPES[dtype_name]
    benchmark.group = f"DWS block {block} ({mode}, {dtype_name}), batch {BATCH} x {FRAMES} frames"
    channels_last = impl == "cudnn_channels_last"
    fn = kd.dws_block if impl == "triton" else kd.dws_block_ref
    params = _params(c_in, dtype, channels_last)
    args = [params[k] for k in NAMES]
    x_shape = (BATCH, c_in, FRAMES + KERNEL - 1, freq)
    out_shape = (BATCH, CHANNELS, FRAMES, freq // pool)
    training = mode == "fwd_bwd"
    x_needs_grad = training and c_in > 1  # block 1's input is the model input

    def make_x():
        x = torch.randn(x_shape, device="cuda", dtype=dtype)
        return x.to(memory_format=torch.channels_last) if channels_last else x

    if impl == "triton" and mode == "inference":  # a sanity check of the compiled kernel first
        with torch.inference_mode():
            x = make_x()
            got = fn(x, *args, pool=pool, training=False)
            want = kd.dws_block_ref(x, *args, pool=pool, training=False)
        tol = 2e-2 * want.abs().max().item()
        assert (got.float() - want.float()).abs().max().item() <= tol, "Triton output differs from cuDNN"

    if mode == "inference":
        def setup():
            x = make_x()
            torch.cuda.synchronize()
            return (x,), {}

        def target(x):
            with torch.inference_mode():
                out = fn(x, *args, pool=pool, training=False)
            torch.cuda.synchronize()
            return out
    else:
        def setup():
            for t in args:
                t.grad = None
            x = make_x().requires_grad_(x_needs_grad)
            cotangent = torch.randn(out_shape, device="cuda", dtype=dtype)
            torch.cuda.synchronize()
            return (x, cotangent), {}

        def target(x, cotangent):
            out = fn(x, *args, pool=pool, training=True)
            out.backward(cotangent)
            torch.cuda.synchronize()
            return out

    measure(benchmark, target, setup, budget_s=5, min_rounds=5, max_rounds=100, warmup_rounds=3)

    elem = torch.finfo(dtype).bits // 8
    x_bytes = BATCH * c_in * (FRAMES + KERNEL - 1) * freq * elem
    out_bytes = BATCH * CHANNELS * FRAMES * (freq // pool) * elem
    nbytes = x_bytes + out_bytes
    if training:
        nbytes += out_bytes + (x_bytes if x_needs_grad else 0)
    flops = 2 * _macs(freq) * (3 if training else 1)
    key = f"{block}/{mode}/{dtype_name}/{impl}"
    res = record(benchmark, "kernel_dws", key, impl=impl, block=block, mode=mode, dtype=dtype_name,
                 batch=BATCH, frames=FRAMES, channels=CHANNELS, x_shape=list(x_shape),
                 tf32=bool(torch.backends.cudnn.allow_tf32), device=torch.cuda.get_device_name(),
                 compulsory_bytes=nbytes,
                 derive=lambda t: {"ms_per_call": 1e3 * t, "effective_gb_per_s": nbytes / t / 1e9,
                                   "model_tflop_per_s": flops / t / 1e12,
                                   "frames_per_second": BATCH * FRAMES / t})
    if impl == "triton" and res.median_s:
        for other in ("cudnn_nchw", "cudnn_channels_last"):
            other_key = f"{block}/{mode}/{dtype_name}/{other}"
            found = [r for r in RESULTS if r.figure == "kernel_dws" and r.model == other_key and r.median_s]
            if found:
                ratio = found[-1].median_s / res.median_s
                benchmark.extra_info[f"speedup_vs_{other}"] = ratio
                res.extra[f"speedup_vs_{other}"] = ratio
