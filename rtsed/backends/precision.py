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


def cpu_has_bf16_gemm() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16; Linux /proc/cpuinfo)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


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
