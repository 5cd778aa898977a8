"""Numeric precision of the CPU paths: fp32 (the default, the reference) or bf16 GEMMs.

"bf16" runs the model under ``torch.autocast("cpu", dtype=torch.bfloat16)``: the big GEMMs
(the CNN's pointwise convs; in training also f_dil's) take bf16 inputs with float32
accumulation, twice the fp32 rate on a CPU with AVX512_BF16 or AMX-BF16. Everything else (the native
depthwise convs, pools, BatchNorm, f_dil + classifier at inference, the loss, optimizer state)
stays float32. ``rtsed.backends.dispatch.cpu_gemm_dtype`` is where the paths read it.

Training uses it through ``train.fit --precision`` (tested to converge like fp32); inference
through ``rtsed.detect`` / ``rtsed.live --precision`` and ``ModelStream(precision=...)``. Not on
CUDA (not measured there) and not in exported ONNX graphs (onnxruntime runs them in fp32).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

PRECISIONS = ("fp32", "bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(flags.split(":", 1)[-1].split())


def cpu_has_bf16_gemm() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16; Linux /proc/cpuinfo)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


# int8 dot-product extensions onnxruntime's integer kernels use (MLAS), fastest first.
INT8_DOT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


def cpu_int8_dot(flags: set[str] | None = None) -> str | None:
    """This CPU's int8 dot-product extension (the first of INT8_DOT_FLAGS it has), or None:
    without one, int8 graphs run on plain AVX2/AVX-512 integer code, about as fast as fp32."""
    flags = cpu_flags() if flags is None else flags
    return next((f for f in INT8_DOT_FLAGS if f in flags), None)


def int8_note(flags: set[str] | None = None) -> str:
    """One line: which int8 kernels an int8 ONNX graph runs with on this CPU."""
    dot = cpu_int8_dot(flags)
    if dot is not None:
        return f"{dot}: int8 ONNX graphs (rtsed.export --quantize int8) run onnxruntime's VNNI integer kernels"
    return ("no VNNI (avx512_vnni/avx_vnni): an int8 ONNX graph still runs, on slower integer code that is "
            "likely no faster than fp32; use an fp32 graph here")


def check_precision(precision: str, device: str = "cpu", backend: str = "torch", what: str = "--precision") -> None:
    """Raise ValueError naming the fix where ``precision`` cannot run; warn where bf16 would be
    emulated (slower than fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"{what} {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return
    if backend != "torch":
        raise ValueError(f"{what} bf16 runs on the torch backend only (onnxruntime runs the exported graph in fp32): "
                         "use --backend torch, or --precision fp32")
    if str(device).split(":")[0] != "cpu":
        raise ValueError(f"{what} bf16 is a CPU path (its GEMMs in bf16, measured on CPUs only); on {device} "
                         "use --precision fp32")
    if not cpu_has_bf16_gemm():
        warnings.warn(f"{what} bf16: this CPU has no AVX512_BF16 or AMX-BF16, so bf16 GEMMs are emulated and likely "
                      "slower than fp32; use --precision fp32", RuntimeWarning, stacklevel=2)


def autocast(precision: str, device_type: str = "cpu"):
    """The context a model call runs in for ``precision``: CPU autocast to bfloat16 for "bf16",
    nothing for "fp32"."""
    if precision == "bf16":
        import torch  # (here: the CLIs import this module for PRECISIONS before they need torch)

        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
