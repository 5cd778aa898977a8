"""Which implementation of an op runs: the reference torch compositions, the CPU fast paths
(oneDNN/MKL arrangements and rtsed.backends.native's kernels), or the Triton kernels of kernels/.

``RTSED_KERNELS`` chooses:

- ``ref``: the pure-torch compositions (the reference every fast path is tested against);
- ``triton``: the fused Triton kernels; asking for them where they cannot run (no triton, no CUDA,
  a CPU tensor) is an error, never a silent fallback;
- ``auto`` (default): triton for CUDA tensors when it is installed and the op has a kernel.
  CPU tensors take the CPU fast paths, the same arithmetic arranged for oneDNN/MKL:
  ``cpu_fast_path`` (channels-last CNN, the chunked f_dil + BN + classifier of
  rtsed.backends.cpu_head; not while a graph is traced for ONNX export, whose chunk loops would
  freeze at the traced length) and ``eval_fast_path`` (eval-mode BNs folded into neighbouring
  weights; also in exported graphs). The Triton interpreter runs only when asked for by name.

``RTSED_NATIVE`` (rtsed.backends.native) switches the native C++ kernels off with 0.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rtsed.backends import native

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

BACKENDS = ("auto", "ref", "triton")

OPS = ("dws_block", "dilated_temporal", "dilated_step")

CPU_FAST_DTYPES = (torch.float32, torch.float64)  # dtypes the CPU fast paths take


class KernelUnavailableError(RuntimeError):
    """RTSED_KERNELS=triton was asked for where the Triton kernels cannot run."""


_forced: list[str] = []  # innermost ``forced_backend`` wins over the environment


@contextlib.contextmanager
def forced_backend(name: str):
    """Run a block of code under one backend whatever RTSED_KERNELS says (e.g. "ref" for
    ``macs_per_frame``, whose forward hooks must see the reference modules)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; one of {BACKENDS}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def requested_backend() -> str:
    """The backend named by RTSED_KERNELS (default auto); a typo is an error, not a fallback."""
    if _forced:
        return _forced[-1]
    value = os.environ.get("RTSED_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"RTSED_KERNELS={value!r} is not one of {BACKENDS}; unset it or pick one")
    return value


def backend_for(op: str, x: Tensor) -> str:
    """Resolve the Triton-or-not backend ("ref" or "triton") for one op on one input; CPU fast
    paths are chosen by ``cpu_fast_path`` / ``eval_fast_path``."""
    requested = requested_backend()
    if requested == "ref":
        return "ref"
    if requested == "auto" and not x.is_cuda:
        # The interpreter (TRITON_INTERPRET=1 on CPU tensors) is for kernel tests, which ask for
        # it explicitly; auto never sends CPU work to it. Decided before looking for triton:
        # that lookup (two find_spec calls, ~50 us) ran 4 times per streaming step.
        return "ref"
    usable, why = _triton_usable(op, x)
    if requested == "triton" and not usable:
        raise KernelUnavailableError(f"RTSED_KERNELS=triton but {op} cannot run in Triton here: {why}. "
                                     "Set RTSED_KERNELS=ref or auto.")
    return "triton" if usable else "ref"


def cpu_fast_path(x: Tensor) -> bool:
    """Whether CPU fast paths apply to x: RTSED_KERNELS=auto, a CPU tensor of a fast dtype, and
    no ONNX export being traced. The model also uses it to run its CNN blocks channels-last
    (oneDNN's fast layout on CPU: a 1x1 conv becomes one GEMM over (rows, C))."""
    exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    return (requested_backend() == "auto" and not x.is_cuda and x.dtype in CPU_FAST_DTYPES
            and not exporting)


def native_eval(x: Tensor, *params: Tensor) -> bool:
    """Whether eval-mode inference on x may run rtsed.backends.native's forward kernels: the CPU fast path
    (``cpu_fast_path``: not during ONNX export, whose graphs must stay plain ops), the kernels
    built (RTSED_NATIVE on, a compiler found), and no autograd recording through x or ``params``
    (the kernels have no backward)."""
    # Cheapest tests first: this runs once per block per streaming step.
    if not x.is_cpu or x.dtype not in native.DTYPES:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    if not cpu_fast_path(x):
        return False
    return native.available()


def cpu_gemm_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype the CPU training fast paths (rtsed.backends.cpu_block, rtsed.backends.cpu_head) run their big
    GEMMs in: bfloat16 when x is on the CPU inside ``torch.autocast("cpu", dtype=torch.bfloat16)``
    (float32 accumulation; 2x the fp32 rate on this AVX512_BF16 CPU at (655360, 256) x (256, 256):
    0.21 s against 0.41), else None (x's dtype). Everything else stays float32 either way."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and \
            torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return torch.bfloat16
    return None


def _triton_usable(op: str, x: Tensor) -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'rtsed[triton]')"
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return False, f"the input is on {x.device}, not CUDA (or TRITON_INTERPRET=1 for the interpreter)"
    if importlib.util.find_spec(f"kernels.{op}") is None:
        return False, f"no Triton kernel for {op} exists yet (kernels/{op}.py)"
    return True, ""

def eval_fast_path(module: "nn.Module", x: Tensor) -> bool:
    """Whether the folded eval-mode compositions apply: RTSED_KERNELS=auto, a CPU tensor of a
    fast dtype, the module in eval mode. Unlike ``cpu_fast_path`` this holds during ONNX export:
    the folded compositions have no loops, and the exported graphs should be the fast ones."""
    return (requested_backend() == "auto" and not x.is_cuda and x.dtype in CPU_FAST_DTYPES
            and not module.training)
