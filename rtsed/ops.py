"""The one switch between stock-torch reference compositions and fused kernels.

Model code calls ``ops.<op>(layer, x)`` and never imports triton. ``RTSED_KERNELS`` chooses:

- ``ref``: the pure-torch compositions (the reference every fast path is tested against);
- ``triton``: the fused Triton kernels; asking for them where they cannot run (no triton, no CUDA,
  a CPU tensor) is an error, never a silent fallback;
- ``auto`` (default): triton for CUDA tensors when it is installed and the op has a kernel,
  ref otherwise (CPU tensors always ref: the interpreter runs only when asked for by name).

Each op with a kernel lives in ``kernels/<op>.py`` and exposes ``<op>_layer(layer, ...)`` with
the signature of the function here (an autograd-aware launcher). An op whose kernel module does
not exist yet resolves to ``ref`` under ``auto`` and is an error under ``triton``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from rtsed.layers import DilatedTemporal, DWSBlock, FrameRing

BACKENDS = ("auto", "ref", "triton")

OPS = ("dws_block", "dilated_temporal", "dilated_step")


class KernelUnavailableError(RuntimeError):
    """RTSED_KERNELS=triton was asked for where the Triton kernels cannot run."""


def requested_backend() -> str:
    """The backend named by RTSED_KERNELS (default auto); a typo is an error, not a fallback."""
    value = os.environ.get("RTSED_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"RTSED_KERNELS={value!r} is not one of {BACKENDS}; unset it or pick one")
    return value


def backend_for(op: str, x: Tensor) -> str:
    """Resolve the backend ("ref" or "triton") for one op on one input."""
    requested = requested_backend()
    if requested == "ref":
        return "ref"
    usable, why = _triton_usable(op, x)
    if requested == "auto" and not x.is_cuda:
        # The interpreter (TRITON_INTERPRET=1 on CPU tensors) is for kernel tests, which ask for
        # it explicitly; auto never sends CPU work to it.
        return "ref"
    if requested == "triton" and not usable:
        raise KernelUnavailableError(f"RTSED_KERNELS=triton but {op} cannot run in Triton here: {why}. "
                                     "Set RTSED_KERNELS=ref or auto.")
    return "triton" if usable else "ref"


def _triton_usable(op: str, x: Tensor) -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'rtsed[triton]')"
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return False, f"the input is on {x.device}, not CUDA (or TRITON_INTERPRET=1 for the interpreter)"
    if importlib.util.find_spec(f"kernels.{op}") is None:
        return False, f"no Triton kernel for {op} exists yet (kernels/{op}.py)"
    return True, ""


def _kernel(op: str):
    """The launcher ``kernels.<op>.<op>_layer`` (imported only when dispatched to)."""
    module = importlib.import_module(f"kernels.{op}")
    return getattr(module, f"{op}_layer")


def dws_block(block: "DWSBlock", x: Tensor) -> Tensor:
    """A whole DWS block on time-padded input: depthwise K x K -> LeakyReLU -> BN -> pointwise
    1x1 -> ReLU -> BN -> max-pool over frequency (-> dropout in training).
    x: (B, C_in, T + K - 1, F) -> (B, C_out, T, F // P)."""
    if backend_for("dws_block", x) == "triton":
        return _kernel("dws_block")(block, x)
    return block.post(block.conv_valid_time(x))


def dilated_temporal(layer: "DilatedTemporal", x: Tensor) -> Tensor:
    """f_dil's dilated conv -> ReLU -> BN on time-padded input.
    x: (B, 1, T + (K - 1) d, C) -> (B, C_out, T, W)."""
    if backend_for("dilated_temporal", x) == "triton":
        return _kernel("dilated_temporal")(layer, x)
    return layer.conv_relu_bn(x)


def dilated_step(layer: "DilatedTemporal", frames: Tensor, state: "FrameRing") -> Tensor:
    """One streaming step of f_dil over its ring buffer: writes frames (B, n, C) into the ring
    at state.write_pos, advances it, and returns (B, n, C_out * W) for the new frames."""
    if backend_for("dilated_step", frames) == "triton":
        return _kernel("dilated_step")(layer, frames, state)
    return layer.step_slice_ref(frames, state)
