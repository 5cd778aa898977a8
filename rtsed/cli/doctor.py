"""``python -m rtsed.doctor``: what runs on this machine, and why.

Prints the environment that rtsed.backends.dispatch decides from (RTSED_KERNELS, RTSED_NATIVE,
torch, CUDA, triton, the native kernels and their compiler), the allocator and threads,
onnxruntime's providers, bf16 support and which int8 kernels an int8 ONNX graph gets (VNNI or not), then, for each op and each way of running a model
(inference, a streaming step, training, bf16 inference, an ONNX export trace), the implementation
the dispatch module chooses and why. The choices come from calling the dispatch functions
themselves on a dnd_7_10 (DWS blocks, f_dil) and a base (CNN blocks) model.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import warnings

import torch
from torch import nn

from rtsed.backends import allocator, cpu, dispatch, native, precision
from rtsed.backends.dispatch import CPU_TRAIN, FOLDED, FOLDED_EXPORT, NATIVE, TRITON
from rtsed.models.model import build_model

MODES = ("inference", "streaming step", "training", "bf16 inference", "ONNX export")


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(__import__(module), "__version__", "installed")
    except Exception as error:  # a broken install is worth reporting, not crashing on
        return f"installed but fails to import ({type(error).__name__}: {error})"


def _compiler_line() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        return f"{cxx}: not found (apt-get install g++)"
    try:
        first = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{cxx}: fails to run ({error})"
    return f"{path}: {first[0] if first else '?'}"


def _onnxruntime_line() -> str:
    try:
        import onnxruntime as ort
    except ImportError:
        return "not installed (pip install 'rtsed[cpu]', or 'rtsed[gpu]' on a CUDA machine)"
    return f"{ort.__version__}, providers {', '.join(ort.get_available_providers())}"


def environment() -> list[tuple[str, str]]:
    """(name, value) rows: what the dispatch decides from, and the rest of the machine."""
    kernels_env = os.environ.get("RTSED_KERNELS")
    native_env = os.environ.get("RTSED_NATIVE")
    cuda = torch.cuda.is_available()
    triton = _version("triton")
    bf16 = precision.cpu_has_bf16_gemm()
    return [
        ("RTSED_KERNELS", f"{dispatch.requested_backend()}" + ("" if kernels_env else " (unset: the default)")),
        ("RTSED_NATIVE", native_env if native_env else "unset (on)"),
        ("python", f"{platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs"),
        ("torch", f"{torch.__version__}; oneDNN {'yes' if torch.backends.mkldnn.is_available() else 'no'}"),
        ("CUDA", torch.cuda.get_device_name(0) if cuda else "not available"),
        ("triton", triton or "not installed (pip install 'rtsed[triton]')"),
        ("threads", f"torch {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"),
        ("allocator", f"{allocator.loaded_allocator()} (train.fit, rtsed.detect and rtsed.live re-execute under "
                      f"tcmalloc/jemalloc when installed: "
                      f"{allocator.find_allocator('tcmalloc') or allocator.find_allocator('jemalloc') or 'none found'})"),
        ("C++ compiler", _compiler_line()),
        ("native kernels", native.status()),
        ("bf16", "AVX512_BF16 or AMX-BF16: --precision bf16 runs native bf16 GEMMs" if bf16
         else "no AVX512_BF16/AMX-BF16: --precision bf16 would be emulated (slower than fp32)"),
        ("onnxruntime", _onnxruntime_line()),
        ("int8", precision.int8_note()),
    ]


def _why(impl: str, op: str, x: torch.Tensor, training: bool) -> str:
    """The facts that made dispatch choose ``impl``."""
    requested = dispatch.requested_backend()
    where = f"{x.device.type} {str(x.dtype).removeprefix('torch.')}"
    if impl == TRITON:
        return f"RTSED_KERNELS={requested}, {where} tensor, triton and its kernel found"
    if impl == NATIVE:
        return f"eval mode, {where}, no autograd; native kernels built"
    if impl == FOLDED:
        if not dispatch.native_kernels(x.dtype):
            return f"eval mode, {where}; BNs folded; native kernels {native.status()}"
        return f"eval mode, {where}; BNs folded (no native kernel for this op or shape)"
    if impl == FOLDED_EXPORT:
        return "traced for ONNX export: BNs folded into plain ops (no native calls, no chunk loops)"
    if impl == CPU_TRAIN:
        passes = "native" if dispatch.native_kernels(x.dtype) else f"torch (native kernels {native.status()})"
        return f"{'training' if training else 'autograd'} on {where}; elementwise passes {passes}"
    if requested == "ref":
        return "RTSED_KERNELS=ref asks for the reference"
    if x.is_cuda:
        return f"{where}: no Triton kernel runs for {op} here"
    if dispatch.exporting():
        return "traced for ONNX export: the reference composition"
    if training and op.startswith("frequency_block (cnn"):
        return "no CPU training fast path for f_cnn blocks (oneDNN runs the reference's convolutions)"
    return f"{where}: no fast path applies"


class _Probe(nn.Module):
    """Records the dispatch decisions in its forward, so that they can be taken inside a trace."""

    def __init__(self, decide):
        super().__init__()
        self.decide = decide
        self.rows = []

    def forward(self, x):
        self.rows = self.decide()
        return x * 1


def _decisions(device: str, mode: str) -> list[tuple[str, str, str]]:
    """(op, implementation, why) rows for one device and mode, from dispatch itself."""
    dnd, base = build_model("dnd_7_10").to(device), build_model("base").to(device)
    training = mode == "training"
    for model in (dnd, base):
        model.train(training)
    grad = training
    dtype = torch.float32

    def frames(*shape, requires_grad=False):
        return torch.zeros(*shape, device=device, dtype=dtype, requires_grad=requires_grad)

    def decide():
        rows = []
        block_dws, block_cnn, t = dnd.blocks[1], base.blocks[1], dnd.temporal
        x_block = frames(1, 256, 8 if mode != "streaming step" else 4, 8)
        h = frames(1, 256, 16 if mode != "streaming step" else 4, 1)
        for name, block, separable, params in (
                ("frequency_block (dws)", block_dws, True, (block_dws.depthwise.weight, block_dws.pointwise.weight)),
                ("frequency_block (cnn)", block_cnn, False, (block_cnn.conv.weight,))):
            impl = dispatch.frequency_block(x_block, separable, block.training, block.kernel, block.out_channels,
                                            block.pool_size, *params)
            rows.append((name, impl, x_block))
        if mode == "streaming step":
            rows.append(("dilated_step_logits", dispatch.dilated_step_logits(h, t.training, dnd.classifier.weight, t.conv.weight), h))
        else:
            rows.append(("dilated_head", dispatch.dilated_head(h, t.training, dnd.classifier.weight, t.conv.weight, t.bn.weight), h))
        rows.append(("dilated_temporal", dispatch.dilated_temporal(h), h))
        rows.append(("dilated_step", dispatch.dilated_step(h), h))
        if mode != "ONNX export":  # (the exported graphs' GEMMs are plain Conv/MatMul nodes)
            operands = frames(640, 256), frames(256, 256, requires_grad=grad), frames(256, requires_grad=grad)
            rows.append(("gemm 640x256 @ 256x256", dispatch.gemm(*operands, cpu.has_onednn_linear()), h))
        return [(op, impl, _why(impl, op, x, training) if not op.startswith("gemm") else _gemm_why(impl))
                for op, impl, x in rows]

    context = torch.enable_grad() if grad else torch.no_grad()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16 inference" else contextlib.nullcontext()
    with context, autocast:
        if mode == "ONNX export":
            probe = _Probe(decide)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's warnings about the probe itself
                torch.jit.trace(probe, (frames(1),), check_trace=False)
            return probe.rows
        return decide()


def _gemm_why(impl: str) -> str:
    return {"onednn-bf16": "CPU bf16 autocast: bf16 operands, float32 accumulation (oneDNN)",
            "onednn": "CPU fp32, no autograd, big enough: oneDNN with the activation fused",
            "addmm": "MKL addmm (autograd records, a small GEMM, not fp32 on the CPU, or no oneDNN linear)"}[impl]


def report() -> str:
    lines = ["rtsed doctor: what runs on this machine, and why", ""]
    env = environment()
    width = max(len(name) for name, _ in env)
    lines += [f"  {name:<{width}}  {value}" for name, value in env]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for mode in MODES:
            if device == "cuda" and mode in ("bf16 inference", "ONNX export"):
                continue
            lines += ["", f"{device}, {mode}:"]
            try:
                rows = _decisions(device, mode)
            except dispatch.KernelUnavailableError as error:
                lines.append(f"  error: {error}")
                continue
            w = max(len(op) for op, _, _ in rows)
            iw = max(len(impl) for _, impl, _ in rows)
            lines += [f"  {op:<{w}}  {impl:<{iw}}  {why}" for op, impl, why in rows]
    lines += ["", "Implementations: reference (stock torch), triton (kernels/), cpu-folded (eval: BNs folded, "
              "oneDNN), onnx-folded (the same, traced), native (rtsed/backends/native C++), cpu-train "
              "(CPU autograd functions); docs/fast-paths.md explains each."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m rtsed.doctor", description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
