"""Native CPU kernels: the ``*.cpp`` files beside this module, compiled on first use into one
shared library and called through ctypes. Each source has a Python module of the same name here
that declares its functions' signatures (``declare``) and wraps them for tensors:

- ``block``: a training-mode DWS block's fused passes (block 1's conv with its activation and
  BN statistics; activation + statistics + pool; the BN/activation backwards) and the depthwise
  conv backward (used by ``rtsed.backends.cpu_block``);
- ``head``: the non-GEMM parts of f_dil + BN + classifier's backward (used by ``rtsed.backends.cpu_head``),
  and its eval-mode forward straight to logits, conv and classifier in one pass (used by offline
  inference through ``rtsed.backends.cpu_eval`` and by streaming steps in ``rtsed.ops.head``);
- ``eval_block``: an eval-mode DWS block's non-GEMM parts (the depthwise / one-channel conv with
  its LeakyReLU; ReLU + max-pool + BN affine after the pointwise GEMM), used by
  ``rtsed.backends.cpu_eval.dws_block`` (rtsed.ops.block's native path) offline and streaming.

``common.h`` holds the helpers the sources share (SIMD vectors, the static thread split).

What they are for: the CPU training step of dnd_7_10 spent much of its non-GEMM time in torch's
separate elementwise kernels, each a full pass over full-resolution activations (671 MB for
block 1 at batch 16 x 1024), and in oneDNN's slow depthwise backward. Each function here does
everything its data allows in one pass. Every function exists for float32 and float64
(``<name>_f32`` / ``<name>_f64``); the float64 ones let tests check the algebra to ~1e-12.

Why ctypes and not torch.utils.cpp_extension: the kernels take raw pointers and need no torch
headers, so they build in about a second with plain g++ (torch's headers take about a minute on
these 2-core machines) and need no ninja. Built with -fopenmp and loaded after torch, they share
torch's OpenMP runtime; each call uses ``torch.get_num_threads()`` threads.

Build: ``$CXX`` (default g++) ``-O3 -march=native -fopenmp -shared``, cached in
``RTSED_NATIVE_CACHE`` (default ~/.cache/rtsed/native) under a key of the source, the compiler's
version and the CPU's flags. ``RTSED_NATIVE=0`` turns the kernels off (callers then run their
torch compositions). A missing or failing compiler is reported once as a warning naming the fix,
and the torch compositions run: slower, same results.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

FOLDER = Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
DTYPES = (torch.float32, torch.float64)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None  # why the library is unavailable, once known


class NativeBuildError(RuntimeError):
    """The native kernels could not be compiled or loaded."""


def enabled() -> bool:
    """RTSED_NATIVE is not 0/false/off."""
    return os.environ.get("RTSED_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def sources() -> list[Path]:
    """Every file the build reads: the ``*.cpp`` sources and the ``*.h`` headers they include
    (all part of the cache key; only the ``.cpp`` files are compiled)."""
    return sorted([*FOLDER.glob("*.cpp"), *FOLDER.glob("*.h")])


def build(cache_dir: Path | None = None) -> Path:
    """Compile the sources (or reuse the cached build) and return the shared library's path.
    Raises NativeBuildError naming the compiler's complaint."""
    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NativeBuildError(f"no C++ compiler: running {cxx!r} failed ({error})") from error
    texts = [f"{path.name}\n{path.read_text()}" for path in sources()]
    key = hashlib.sha256("\n".join([*texts, cxx, version, " ".join(FLAGS), _cpu_flags()]).encode())
    folder = cache_dir or Path(os.environ.get("RTSED_NATIVE_CACHE", Path.home() / ".cache/rtsed/native"))
    target = folder / f"rtsed_native_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent builders (DDP ranks) never load a
    # half-written library.
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        compiled = [str(path) for path in sources() if path.suffix == ".cpp"]
        result = subprocess.run([cxx, *FLAGS, *compiled, "-o", str(partial)], capture_output=True,
                                text=True, timeout=300)
        if result.returncode != 0:
            raise NativeBuildError(f"{cxx} failed to compile {FOLDER}/*.cpp:\n{result.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


_ARGUMENT_TYPES = {"p": ctypes.c_void_p, "i64": ctypes.c_int64, "int": ctypes.c_int}
_signatures: dict[str, list[str]] = {}


def declare(name: str, kinds: list[str]) -> None:
    """Declare the C function pair ``<name>_f32`` / ``<name>_f64``: its argument kinds in order,
    "p" (a pointer: a tensor's data_ptr), "i64", "int", or "T" (a float or double scalar, by
    the variant). Wrapper modules declare their functions when imported."""
    _signatures[name] = kinds


def _load(path: Path) -> ctypes.CDLL:
    return ctypes.CDLL(str(path))


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when disabled or unavailable (warned once, with the fix)."""
    global _library, _failure
    if not enabled():
        return None
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is None and _failure is None:
            try:
                _library = _load(build())
            except (NativeBuildError, OSError, AttributeError) as error:
                _failure = str(error)
                warnings.warn(
                    f"rtsed: native CPU kernels unavailable, the CPU paths run the slower torch compositions "
                    f"(same results). Why: {_failure}. Fix: install a C++ compiler with OpenMP "
                    "(apt-get install g++) and let RTSED_NATIVE_CACHE (default ~/.cache/rtsed/native) name a "
                    "writable folder, or set RTSED_NATIVE=0 to silence this.", RuntimeWarning, stacklevel=2)
    return _library


def available() -> bool:
    return library() is not None


def status() -> str:
    """One line for ``python -m rtsed.doctor``: whether the kernels run here, or why not."""
    if not enabled():
        return "off (RTSED_NATIVE=0)"
    lib = library()
    if lib is None:
        return f"unavailable: {_failure}"
    return f"built with {_compiler()} ({lib._name})"


def function(name: str, dtype: torch.dtype):
    """The ctypes function ``<name>_f32`` or ``<name>_f64`` for tensors of ``dtype``, its
    argument types set from ``declare``. Raises NativeBuildError when the library is unavailable."""
    lib = library()
    if lib is None:
        raise NativeBuildError(f"native kernels unavailable: {_failure or 'RTSED_NATIVE=0'}")
    suffix, scalar = ("f32", ctypes.c_float) if dtype == torch.float32 else ("f64", ctypes.c_double)
    fn = getattr(lib, f"{name}_{suffix}")
    if fn.argtypes is None:
        fn.argtypes = [scalar if kind == "T" else _ARGUMENT_TYPES[kind] for kind in _signatures[name]]
        fn.restype = None
    return fn


_called: dict[tuple[str, torch.dtype], tuple[ctypes.CDLL, object]] = {}  # (name, dtype) -> (library, function)
# Whether a profiler runs: nearly free, where record_function costs even unprofiled. A private
# torch function; without it (another torch), every call is labelled.
_profiler_enabled = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", lambda: True)


def call(name: str, dtype: torch.dtype, *args) -> None:
    """Run ``<name>_f32/_f64``; while a profiler runs, under a label ``rtsed::native::<name>``
    (so profiles, e.g. benchmarks.profile_step, see native time as operators). The function is
    looked up once per library: a streaming step makes ~10 native calls, and the lookup and an
    unconditional record_function would be a visible share of it. Callers check ``available()`` first
    (which honours RTSED_NATIVE); ``call`` does not re-read the environment."""
    cached = _called.get((name, dtype))
    if cached is None or cached[0] is not _library:
        fn = function(name, dtype)
        _called[(name, dtype)] = (_library, fn)
    else:
        fn = cached[1]
    if _profiler_enabled():
        with torch.profiler.record_function(f"rtsed::native::{name}"):
            fn(*args)
    else:
        fn(*args)


def check(name: str, dtype: torch.dtype, **tensors: Tensor) -> None:
    if dtype not in DTYPES:
        raise TypeError(f"{name}: native kernels take float32 or float64, got {dtype}")
    for arg, t in tensors.items():
        if not t.is_cpu or not t.is_contiguous():  # (is_cpu: no device object per tensor per call)
            raise ValueError(f"{name}: {arg} must be a contiguous CPU tensor (device {t.device}, "
                             f"strides {t.stride()})")
        if t.dtype not in (dtype, torch.int8):
            raise TypeError(f"{name}: {arg} is {t.dtype}, expected {dtype}")




def channel_sums(channels: int, n: int) -> list[Tensor]:
    """n zeroed float64 (C,) accumulators for a kernel's per-channel sums."""
    return [torch.zeros(channels, dtype=torch.float64) for _ in range(n)]
