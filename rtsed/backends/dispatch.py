"""The one place that decides which implementation of an op runs.

Every op in rtsed.ops asks one function here, once per call, and runs what it answers; layers
never ask. The answer depends on:

- ``RTSED_KERNELS``: ``ref`` (the pure-torch reference compositions, which every fast path is
  tested against), ``triton`` (the Triton kernels of kernels/; an error where they cannot run,
  never a silent fallback) or ``auto`` (default: Triton for CUDA tensors when it is installed and
  the op has a kernel, the CPU fast paths for CPU tensors; the Triton interpreter runs only when
  asked for by name);
- ``RTSED_NATIVE`` (0/false/off turns rtsed.backends.native's C++ kernels off) and whether they
  could be built (a C++ compiler with OpenMP);
- the input's device and dtype, the layer's training mode and shapes (plain facts the op
  passes: a decision never reads a module), whether autograd records (the native inference
  kernels have no backward), whether a graph is being traced for ONNX export (exported graphs
  must be plain ops, without native calls or time-chunk loops frozen at the traced length), and
  CPU autocast to bfloat16 (``--precision bf16``: the big GEMMs in bf16).

The implementations, by the names the decisions return:

- ``reference``: stock torch, the layer's own composition;
- ``triton``: ``kernels/<op>.py``;
- ``cpu-folded``: eval mode on the CPU, every BatchNorm folded into its neighbouring weights,
  channels-last, oneDNN GEMMs;
- ``onnx-folded``: the same folded arithmetic, arranged for an ONNX trace;
- ``native``: eval mode on the CPU, rtsed.backends.native's kernels (the GEMMs stay oneDNN's);
- ``cpu-train``: training on the CPU, rtsed.backends.cpu_block / cpu_head (autograd functions
  with hand-written backwards; their elementwise passes native where the kernels are built).

``python -m rtsed.doctor`` prints, for this machine, what each op runs and why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
from torch import Tensor

from rtsed.backends import native
from rtsed.backends.native import eval_block

# The implementations (see the module docstring).
REFERENCE = "reference"
TRITON = "triton"
FOLDED = "cpu-folded"
FOLDED_EXPORT = "onnx-folded"
NATIVE = "native"
CPU_TRAIN = "cpu-train"
BACKENDS = ("auto", "ref", "triton")

OPS = ("dws_block", "dilated_temporal", "dilated_step", "dilated_step_logits")

CPU_FAST_DTYPES = (torch.float32, torch.float64)  # dtypes the CPU fast paths take


class KernelUnavailableError(RuntimeError):
    """RTSED_KERNELS=triton was asked for where the Triton kernels cannot run."""


_forced: list[str] = []  # innermost ``forced_backend`` wins over the environment


@contextlib.contextmanager
def forced_backend(name: str):
    """Run a block of code under one backend whatever RTSED_KERNELS says (e.g. "ref" for
    ``macs_per_frame``, whose forward hooks must see the modules a reference forward calls)."""
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


def backend_for(op: str, x: Tensor, shape_problem: str = "", elements: int = 0) -> str:
    """Resolve the Triton-or-not backend ("ref" or "triton") for one op on one input; CPU fast
    paths are chosen by ``cpu_fast_path`` / ``eval_fast_path``. ``shape_problem``: why the op's
    shapes are outside what its kernel takes ("" when they are inside); ``elements``: the largest
    tensor the kernel would index (its output, usually)."""
    requested = requested_backend()
    if requested == "ref":
        return "ref"
    if requested == "auto" and not x.is_cuda:
        # The interpreter (TRITON_INTERPRET=1 on CPU tensors) is for kernel tests, which ask for
        # it explicitly; auto never sends CPU work to it. Decided before looking for triton:
        # that lookup (two find_spec calls) is slow next to a streaming step.
        return "ref"
    return triton_decision(op, requested, x.device.type, x.dtype, shape_problem=shape_problem,
                           elements=max(elements, x.numel()), **_triton_install_facts(op))


TRITON_DTYPES = (torch.float32, torch.float16)  # what every kernel in kernels/ computes in
TRITON_MAX_ELEMENTS = 2**31 - 1  # the kernels' offsets are int32: a bigger tensor would wrap around


def triton_decision(op: str, requested: str, device_type: str, dtype: torch.dtype, *, triton_installed: bool,
                    interpret: bool, kernel_exists: bool, shape_problem: str = "", elements: int = 0) -> str:
    """The decision of ``backend_for`` on plain facts (no tensor, no GPU needed to test it):
    "triton" where the op's kernel can take the input, else "ref". ``requested``: RTSED_KERNELS
    ("auto" or "triton"); asked by name, a kernel that cannot take the input is an error
    (KernelUnavailableError naming why), never a silent fallback; under auto, CUDA work the
    kernels do not take (float64, bfloat16, shapes outside their limits, tensors past int32
    offsets) runs the reference, which takes anything torch takes."""
    why = ""
    if not triton_installed:
        why = "triton is not installed (pip install 'rtsed[triton]')"
    elif device_type != "cuda" and not interpret:
        why = f"the input is on {device_type}, not CUDA (or TRITON_INTERPRET=1 for the interpreter)"
    elif not kernel_exists:
        why = f"no Triton kernel for {op} exists yet (kernels/{op}.py)"
    elif dtype not in TRITON_DTYPES:
        why = f"its kernels compute in float32 or float16, not {dtype}"
    elif shape_problem:
        why = shape_problem
    elif elements > TRITON_MAX_ELEMENTS:
        why = f"a tensor of {elements:,} elements is past the kernels' int32 offsets (2^31 - 1)"
    if not why:
        return "triton"
    if requested == "triton":
        raise KernelUnavailableError(f"RTSED_KERNELS=triton but {op} cannot run in Triton here: {why}. "
                                     "Set RTSED_KERNELS=ref or auto.")
    return "ref"


def exporting() -> bool:
    """Whether a graph is being traced (for ONNX export)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def cpu_fast_path(x: Tensor) -> bool:
    """Whether CPU fast paths apply to x: RTSED_KERNELS=auto, a CPU tensor of a fast dtype, and
    no ONNX export being traced. The model also uses it to run its CNN blocks channels-last
    (oneDNN's fast layout on CPU: a 1x1 conv becomes one GEMM over (rows, C)) and, in inference,
    in time chunks."""
    return (requested_backend() == "auto" and not x.is_cuda and x.dtype in CPU_FAST_DTYPES
            and not exporting())


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
    (float32 accumulation; twice the fp32 rate on CPUs with AVX512_BF16), else None (x's dtype).
    Everything else stays float32 either way."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and \
            torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return torch.bfloat16
    return None


def _triton_install_facts(op: str) -> dict[str, bool]:
    """What ``triton_decision`` needs to know about this installation, for ``op``."""
    installed = importlib.util.find_spec("triton") is not None
    return dict(triton_installed=installed, interpret=os.environ.get("TRITON_INTERPRET") == "1",
                kernel_exists=installed and importlib.util.find_spec(f"kernels.{op}") is not None)


def eval_fast_path(x: Tensor, training: bool) -> bool:
    """Whether the folded eval-mode compositions apply: RTSED_KERNELS=auto, a CPU tensor of a
    fast dtype, the layer in eval mode (``training`` False). Unlike ``cpu_fast_path`` this holds
    during ONNX export: the folded compositions have no loops, and the exported graphs should be
    the fast ones."""
    return _eval_fast(x, training)


def _eval_fast(x: Tensor, training: bool) -> bool:
    return requested_backend() == "auto" and not x.is_cuda and x.dtype in CPU_FAST_DTYPES and not training


def prepare(device: torch.device) -> None:
    """Build (or load) now what the choices on ``device`` will need: a first build of the native
    kernels takes seconds, which must not land inside a live stream's first step."""
    if device.type == "cpu":
        native.available()


def native_kernels(dtype: torch.dtype) -> bool:
    """Whether rtsed.backends.native's kernels run for tensors of ``dtype`` (RTSED_NATIVE on, a
    compiler found); where not, the CPU fast paths run the torch compositions beside them (same
    results, slower)."""
    return dtype in native.DTYPES and native.available()


# ---------------------------------------------------------------------------------------- layout

_channels_last_depth = 0  # > 0 inside ``channels_last_convs()``


@contextlib.contextmanager
def channels_last_convs():
    """Within this block, convolutions run channels-last even on one-channel inputs, whose memory
    format cannot be read off their strides (a (B, 1, T, F) tensor is NCHW and channels-last at
    once). SEDModel turns it on around its CNN where ``cpu_fast_path`` holds."""
    global _channels_last_depth
    _channels_last_depth += 1
    try:
        yield
    finally:
        _channels_last_depth -= 1


def channels_last(x: Tensor) -> bool:
    """Whether a convolution on x runs channels-last: x is channels-last by its strides, or a
    one-channel x inside ``channels_last_convs``."""
    return x.dim() == 4 and (
        (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        or (_channels_last_depth > 0 and x.shape[1] == 1))


# ------------------------------------------------------------------------------ GEMMs on the CPU

ONEDNN_MIN_MACS = 4_000_000  # below this, oneDNN's fixed cost per call loses to MKL's addmm


def gemm(x: Tensor, weight: Tensor, bias: Tensor, onednn: bool) -> str:
    """How rtsed.backends.cpu.fused_linear runs ``x @ weight.T + bias``: "onednn-bf16" (bf16
    operands under CPU bf16 autocast, float32 accumulation), "onednn" (fp32, activation fused) or
    "addmm" (MKL, the activation after it; also whenever autograd records: the oneDNN op has no
    backward). ``onednn``: whether this torch has the oneDNN linear."""
    if (onednn and x.device.type == "cpu" and x.dtype == torch.float32
            and x.shape[0] * weight.numel() >= ONEDNN_MIN_MACS
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias)))):
        return "onednn-bf16" if cpu_gemm_dtype(x) == torch.bfloat16 else "onednn"
    return "addmm"


# ------------------------------------------------------------------------------- per-op decisions


def native_block_applies(x: Tensor, kernel: int, out_channels: int, *params: Tensor) -> bool:
    """Whether rtsed.backends.native.eval_block takes a DWS block (``kernel`` K, ``out_channels``
    C) on x (B, C_in, T, F): a depthwise (C -> C) or one-input-channel (1 -> C) block with a
    kernel size the native conv is compiled for, where ``native_eval`` allows native inference
    (``params``: the block's tensors autograd may record through)."""
    # native_eval first: it is False while traced, where the shapes (x's, and the weight's that
    # ``kernel`` was read from) are traced values too.
    return native_eval(x, *params) and kernel in eval_block.KERNELS and x.shape[1] in (1, out_channels)


def cpu_block_applies(x: Tensor, kernel: int, pool: int, training: bool) -> bool:
    """Whether rtsed.backends.cpu_block takes a DWS block (``kernel`` K, max-pool (1, ``pool``))
    on time-padded x (B, C_in, T + K - 1, F): training mode (``training``: both BatchNorms on
    batch statistics), an odd K, a pool of at most F and 127 (its argmax is an int8), at least K
    input frames, float32/float64 CPU input, native kernels built (or buildable). The layer
    vouches for the rest of the structure (rtsed.models.layers.DWSBlock)."""
    return (training and x.device.type == "cpu" and x.dtype in native.DTYPES and x.dim() == 4
            and kernel % 2 == 1 and 1 <= pool <= min(x.shape[3], 127) and x.shape[2] >= kernel
            and native.available())


def frequency_block(x: Tensor, separable: bool, training: bool, kernel: int, out_channels: int, pool: int,
                    *params: Tensor) -> str:
    """A CNN block on time-padded input x (B, C_in, T + K - 1, F): ``separable`` (f_dws) or not
    (f_cnn), ``training`` (BatchNorm on batch statistics, dropout on), its K x K kernel, C_out
    channels, max-pool (1, ``pool``) and ``params`` (the tensors autograd may record through).
    triton (DWS blocks), native or cpu-folded (eval mode; onnx-folded while traced), cpu-train
    (DWS blocks in training), else reference."""
    if separable and (x.is_cuda or requested_backend() == "triton"):  # (no shape facts on the CPU's hot path)
        if separable and backend_for("dws_block", x, _dws_shape_problem(x, kernel, out_channels, pool),
                                     x.shape[0] * out_channels * x.shape[2] * x.shape[-1] if x.dim() == 4 else 0) \
                == "triton":
            return TRITON
    if _eval_fast(x, training):
        if separable and native_block_applies(x, kernel, out_channels, *params):
            return NATIVE
        return FOLDED_EXPORT if torch.jit.is_tracing() else FOLDED
    if separable and training and cpu_fast_path(x) and cpu_block_applies(x, kernel, pool, training):
        return CPU_TRAIN
    return REFERENCE


def _dws_shape_problem(x: Tensor, kernel: int, out_channels: int, pool: int) -> str:
    """Why kernels.dws_block cannot take a block on x (B, C_in, T + K - 1, F), or ""."""
    if x.dim() != 4:
        return f"dws_block takes x (B, C_in, T + K - 1, F), not {x.dim()}-d"
    if kernel % 2 != 1 or x.shape[2] < kernel:
        return f"dws_block takes an odd kernel over at least K frames (K={kernel}, {x.shape[2]} frames)"
    if out_channels % x.shape[1]:
        return f"dws_block's {out_channels} output channels are not a multiple of the {x.shape[1]} input channels"
    if not 1 <= pool <= min(x.shape[3], 127):
        return f"dws_block's pool {pool} is outside [1, min(F={x.shape[3]}, 127)]"
    return ""


def _dilated_elements(rows: int, channels: int, out_channels: int, kernel: int, stride: int) -> int:
    """f_dil's output elements: rows (B T or B n frames) x C_out x W, W = (C - K) // S + 1."""
    return rows * out_channels * max((channels - kernel) // max(stride, 1) + 1, 0)


def dilated_temporal(x: Tensor, out_channels: int = 0, kernel: int = 1, stride: int = 1) -> str:
    """f_dil's conv -> ReLU -> BN on its own, x (B, 1, T + (K - 1) d, C) with a (C_out, 1, K, K)
    kernel and frequency stride S: triton or reference."""
    problem = "" if x.dim() == 4 and x.shape[1] == 1 and kernel <= x.shape[-1] else \
        f"dilated_temporal takes x (B, 1, T', C) with C >= K={kernel}, not {tuple(x.shape)}"
    rows = x.shape[0] * x.shape[2] if x.dim() == 4 else 0
    return TRITON if backend_for("dilated_temporal", x, problem,
                                 _dilated_elements(rows, x.shape[-1], out_channels, kernel, stride)) == "triton" \
        else REFERENCE


def dilated_step(frames: Tensor, out_channels: int = 0, kernel: int = 1, stride: int = 1) -> str:
    """One ring-buffer step of f_dil on its own, frames (B, n, C): triton or reference."""
    problem = "" if frames.dim() == 3 and kernel <= frames.shape[-1] else \
        f"dilated_step takes frames (B, n, C) with C >= K={kernel}, not {tuple(frames.shape)}"
    rows = frames.shape[0] * frames.shape[1] if frames.dim() == 3 else 0
    return TRITON if backend_for("dilated_step", frames, problem,
                                 _dilated_elements(rows, frames.shape[-1], out_channels, kernel, stride)) == "triton" \
        else REFERENCE


def dilated_head(h: Tensor, training: bool, *params: Tensor) -> str:
    """f_dil -> ReLU -> BN -> classifier over a whole sequence h (B, C, T, 1), ``training``: BN
    on batch statistics, ``params``: the weights autograd may record through. On the CPU native
    (eval, no autograd: one pass from CNN frames to logits) or cpu-train (the chunked autograd
    function; also eval with autograd); elsewhere reference (whose f_dil is ``dilated_temporal``'s
    choice, Triton on CUDA)."""
    if cpu_fast_path(h):
        if not training and native_eval(h, *params):
            return NATIVE
        return CPU_TRAIN
    return REFERENCE


def dilated_step_logits(h: Tensor, training: bool, *params: Tensor, kernel: int = 1, classes: int = 0) -> str:
    """A streaming step of f_dil and the classifier, h (B, C, n, 1) new CNN frames (``training``:
    the layer's mode; ``params``: the weights autograd may record through): triton (one kernel
    from the ring to logits, kernels.dilated_step_logits), native (eval on the CPU, one pass from
    the ring to logits), cpu-folded (BN folded into the classifier, two GEMMs; also in exported
    graphs), else reference. ``kernel``: f_dil's K; ``classes``: the classifier's outputs. The
    fused kernel never writes f_dil's output, so the largest tensor it indexes with a frame
    offset is the logits, B n x classes (its ring offsets are int64)."""
    if h.is_cuda or requested_backend() == "triton":  # (no shape facts on the CPU's hot path)
        problem = "" if h.dim() == 4 and kernel <= h.shape[1] else \
            f"dilated_step_logits takes h (B, C, n, 1) with C >= K={kernel}, not {tuple(h.shape)}"
        rows = h.shape[0] * h.shape[2] if h.dim() == 4 else 0
        if backend_for("dilated_step_logits", h, problem, rows * classes) == "triton":
            return TRITON
    if _eval_fast(h, training):
        return NATIVE if native_eval(h, *params) else FOLDED
    return REFERENCE
