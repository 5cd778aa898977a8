"""Compile every Triton kernel of kernels/ for an NVIDIA GPU without one, and report its resources.

    python -m benchmarks.kernel_resources                      # sm_90 and sm_80, every launch, table to stdout
    python -m benchmarks.kernel_resources --write-readme       # ... and into benchmarks/README.md
    python -m benchmarks.kernel_resources --arch 90 --dtype fp32-tf32 --case ring
    python -m benchmarks.kernel_resources --case ring --kernel _dilated_step_logits_kernel
    python -m benchmarks.kernel_resources --jobs 6 --write-readme   # each (arch, dtype) in its own process

How: the launchers (kernels.dws_block.dws_block, kernels.dilated_temporal.dilated_temporal,
kernels.dilated_step.dilated_step, kernels.dilated_step_logits.dilated_step_logits) run on CPU
tensors of the real shapes with their GPU tile choices (``_GPU_TILES``, ``_gpu_config``,
``_gpu_row_programs``: the functions the launchers call
on CUDA, fed the SM count of the target) while every ``kernel[grid](...)`` is recorded instead of
launched. Each distinct launch (kernel, argument types and specialisation, constexprs, warps,
stages) is then compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
and its PTX assembled once more by the bundled ``ptxas -v`` with Triton's flags, whose report gives
registers per thread, spill stores and stack frame (bytes per thread); shared memory is Triton's
allocation (bytes per program). Nothing runs on a device, so nothing here is a timing.

Must run in a process where TRITON_INTERPRET is unset (the kernels must be JIT functions);
tests/test_kernel_compile.py runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# What the launches compile for: (compute capability, SM count of the reference part: H100 SXM, A100).
ARCHS = {90: 132, 80: 108}
# dtype name -> (tensor dtype, cudnn.allow_tf32): fp32 dots in IEEE fp32 or TF32, fp16 dots in fp16.
DTYPES = {"fp32-ieee": (torch.float32, False), "fp32-tf32": (torch.float32, True), "fp16": (torch.float16, False)}
# Workloads: training and eval at the paper's batch; streaming steps of S streams x n new frames.
TRAIN_BATCH, TRAIN_FRAMES = 16, 1024
RING_STREAMS = (1, 16, 256)
RING_FRAMES = (1, 16)
# f_dil kernel sizes of the model grid (dnd_K_d); the dilation is a runtime argument, not compiled in.
DIL_MODELS = ("dnd_3_10", "dnd_5_10", "dnd_7_10")
CASES = ("train", "eval", "ring")

# Spill stores allowed per kernel (bytes per thread) and dot precision: zero unless listed. Each
# listed allowance is a spill that the current tiles do not avoid, rounded up from the offline compile
# for sm_90 and sm_80 (table in benchmarks/README.md). All are fp32 IEEE, which the parity tests ask
# for (TF32 off) while fp32 on CUDA otherwise runs TF32 (torch.backends.cudnn.allow_tf32 defaults to
# on): the f_dil forward and the ring step share one 128 x 64 tile (kernels.dilated_temporal._Config:
# block_r, block_co), sized for TF32 and fp16, where it does not spill.
SPILL_ALLOWANCE = {
    "fp32-ieee": {
        "_dilated_temporal_kernel": 512,
        "_dilated_step_kernel": 4096,
        "_dws_stats2_kernel": 64,  # blocks 2-3 (C_in = C): 128 registers, 48 B
        "_dws_fwd_kernel": 32,  # block 1 on sm_80: 128 registers, 16 B
    },
    "fp32-tf32": {},
    "fp16": {},
}


def spill_budget(kernel: str, dtype: str) -> int:
    """Spill stores (bytes per thread) allowed for ``kernel`` compiled with dots in ``dtype``."""
    return SPILL_ALLOWANCE[dtype].get(kernel, 0)


@dataclasses.dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""
    fn: object  # triton JITFunction
    args: tuple
    kwargs: dict
    case: str

    @property
    def name(self) -> str:
        return self.fn.__name__


@dataclasses.dataclass
class Resources:
    kernel: str
    arch: int
    dtype: str
    case: str
    config: str  # the constexprs and warps/stages that distinguish the variant
    registers: int  # per thread
    spill_stores: int  # bytes per thread
    spill_loads: int  # bytes per thread
    stack: int  # bytes per thread
    shared: int  # bytes per program


@contextlib.contextmanager
def _gpu_choices(sm_count: int, tf32: bool, launches: list, case: list):
    """Make the launchers take their CUDA decisions for CPU tensors and record their launches."""
    from triton.runtime.jit import JITFunction

    from kernels import dilated_step as ds
    from kernels import dilated_step_logits as dsl
    from kernels import dilated_temporal as dt
    from kernels import dws_block as dws

    def precision(x):
        return "tf32" if x.dtype == torch.float32 and tf32 else "ieee"

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), case[0]))

    patches = [
        (dt, "_config", lambda x, c_out: dt._gpu_config(c_out, sm_count)),
        (dt, "_dot_precision", precision),
        (dsl, "_config", lambda ring, c_out: dsl._gpu_config(c_out, sm_count, ring.dtype)),
        (dws, "_tiles", lambda x, name, channels: dws._table_tiles(dws._GPU_TILES, name, channels)),
        (dws, "_row_programs", lambda x: dws._gpu_row_programs(sm_count)),
        (dws, "_dot_precision", precision),
        (dt, "_INTERPRETED", True), (ds, "_INTERPRETED", True), (dsl, "_INTERPRETED", True),
        (dws, "_INTERPRETED", True),  # pass the device checks
        (JITFunction, "run", record),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _param(shape, dtype, grad):
    # Uninitialised: no kernel runs, and the torch work between launches only needs the shapes.
    return torch.empty(shape, dtype=dtype).requires_grad_(grad)


def _dws_blocks(cfg, B: int, T: int, dtype, training: bool) -> None:
    """Every f_dws block of ``cfg`` on (B, C_in, T + K - 1, F) input, backward too when training."""
    from kernels.dws_block import dws_block

    K, C, F = cfg.cnn_kernel, cfg.channels, cfg.n_mels
    c_in = 1
    for pool in cfg.freq_pools:
        x = _param((B, c_in, T + K - 1, F), dtype, training)
        p = [_param(s, torch.float32, training) for s in ((C, 1, K, K), (C,), (C,), (C,))]
        q = [_param(s, torch.float32, training) for s in ((C, C, 1, 1), (C,), (C,), (C,))]
        stats = [torch.zeros(C), torch.ones(C), torch.zeros(C), torch.ones(C)]
        with torch.set_grad_enabled(training):
            out = dws_block(x, *p[:2], *p[2:], *stats[:2], *q[:2], *q[2:], *stats[2:], pool=pool, training=training)
            if training:
                out.backward(torch.empty_like(out))
        c_in, F = C, F // pool


def _dilated(cfg, B: int, T: int, dtype, training: bool) -> None:
    from kernels.dilated_temporal import dilated_temporal

    K, d, S, C = cfg.dil_kernel, cfg.dil_dilation, cfg.dil_stride, cfg.channels
    x = _param((B, 1, T + (K - 1) * d, C), dtype, training)
    w, b, g, beta = (_param(s, torch.float32, training) for s in ((C, 1, K, K), (C,), (C,), (C,)))
    with torch.set_grad_enabled(training):
        out = dilated_temporal(x, w, b, g, beta, torch.zeros(C), torch.ones(C), dilation=d, stride=S,
                               training=training)
        if training:
            out.backward(torch.empty_like(out))


def _ring_step(cfg, streams: int, frames: int, dtype) -> None:
    from kernels.dilated_step import dilated_step

    K, d, S, C = cfg.dil_kernel, cfg.dil_dilation, cfg.dil_stride, cfg.channels
    ring = torch.zeros(streams, (K - 1) * d + frames, C, dtype=dtype)
    w, b, g, beta = (_param(s, torch.float32, False) for s in ((C, 1, K, K), (C,), (C,), (C,)))
    dilated_step(torch.zeros(streams, frames, C, dtype=dtype), ring, 0, w, b, g, beta, torch.zeros(C),
                 torch.ones(C), dilation=d, stride=S)


def _ring_step_logits(cfg, streams: int, frames: int, dtype) -> None:
    """The ring step fused with the classifier (what a streaming model runs on CUDA)."""
    from kernels.dilated_step_logits import dilated_step_logits

    K, d, S, C = cfg.dil_kernel, cfg.dil_dilation, cfg.dil_stride, cfg.channels
    W = (C - K) // S + 1
    ring = torch.zeros(streams, (K - 1) * d + frames, C, dtype=dtype)
    w, b, g, beta = (_param(s, torch.float32, False) for s in ((C, 1, K, K), (C,), (C,), (C,)))
    lin, lin_b = _param((cfg.n_classes, C * W), dtype, False), _param((cfg.n_classes,), dtype, False)
    dilated_step_logits(torch.zeros(streams, frames, C, dtype=dtype), ring, 0, w, b, g, beta, torch.zeros(C),
                        torch.ones(C), lin, lin_b, dilation=d, stride=S)


def record_launches(arch: int, dtype: str, cases=CASES) -> list[Launch]:
    """Every kernel launch of ``cases`` with the GPU choices for ``arch`` and dots in ``dtype``."""
    from rtsed.config import ModelConfig

    tensor_dtype, tf32 = DTYPES[dtype]
    launches: list[Launch] = []
    case = [""]
    models = [ModelConfig.from_name(name) for name in DIL_MODELS]
    with _gpu_choices(ARCHS[arch], tf32, launches, case), torch.no_grad():
        for name in cases:
            case[0] = name
            for i, cfg in enumerate(models):
                with_dws = i == 0  # the models differ only in f_dil
                if name == "train":
                    if with_dws:
                        _dws_blocks(cfg, TRAIN_BATCH, TRAIN_FRAMES, tensor_dtype, True)
                    _dilated(cfg, TRAIN_BATCH, TRAIN_FRAMES, tensor_dtype, True)
                elif name == "eval":
                    if with_dws:
                        _dws_blocks(cfg, TRAIN_BATCH, TRAIN_FRAMES, tensor_dtype, False)
                    _dilated(cfg, TRAIN_BATCH, TRAIN_FRAMES, tensor_dtype, False)
                elif name == "ring":
                    for streams in RING_STREAMS:
                        for frames in RING_FRAMES:
                            if with_dws:
                                _dws_blocks(cfg, streams, frames, tensor_dtype, False)
                            _ring_step(cfg, streams, frames, tensor_dtype)
                            _ring_step_logits(cfg, streams, frames, tensor_dtype)
                else:
                    raise ValueError(f"unknown case {name!r}: choose from {CASES}")
    return launches


def _specialise(launch: Launch, backend):
    """(signature, constexprs, attrs, options) of a launch, as JITFunction.run computes them."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", fn.debug or knobs.runtime.debug)
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # launch options of newer triton only
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    return fn._pack_args(backend, kwargs, bound_args, specialization, options)


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_report(ptx: str, arch_name: str) -> tuple[int, int, int, int]:
    """(registers, spill stores, spill loads, stack frame) from the bundled ptxas's -v report, Triton's flags."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        cmd = [get_ptxas(int(re.sub(r"\D", "", arch_name))).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={arch_name}", str(src), "-o", str(Path(tmp, "k.o"))]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    regs, spill = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log)
    if regs is None or spill is None:
        raise RuntimeError(f"unexpected ptxas report:\n{log}")
    return int(regs.group(1)), int(spill.group(2)), int(spill.group(3)), int(spill.group(1))


def compile_launches(launches: list[Launch], arch: int, dtype: str, progress: bool = False) -> list[Resources]:
    """Compile each distinct launch for sm_<arch>; a compile error raises with the kernel named."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    seen, out = set(), []
    for launch in launches:
        options, signature, constexprs, attrs = _specialise(launch, backend)
        key = (launch.name, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
               options.num_warps, options.num_stages)
        if key in seen:
            continue
        seen.add(key)
        try:
            kernel = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
        except Exception as e:
            raise RuntimeError(f"{launch.name} ({launch.case}, {dtype}) does not compile for sm_{arch}: {e}") from e
        regs, spills, loads, stack = _ptxas_report(kernel.asm["ptx"], sm_arch_from_capability(arch))
        names = [p.name for p in launch.fn.params]
        config = " ".join(f"{names[path[0]]}={value}" for path, value in sorted(constexprs.items())
                          if names[path[0]].isupper() or names[path[0]] in ("K", "P"))
        config += f" warps={options.num_warps} stages={options.num_stages}"
        out.append(Resources(launch.name, arch, dtype, launch.case, config, regs, spills, loads, stack,
                             kernel.metadata.shared))
        if progress:
            print(f"sm_{arch} {dtype} {launch.case} {launch.name} [{config}]: {regs} registers, {spills} B spill "
                  f"stores, {kernel.metadata.shared} B shared", file=sys.stderr, flush=True)
    return out


class UnknownKernelError(ValueError):
    """--kernel named a kernel that none of the recorded launches runs."""


def sweep(arch: int, dtype: str, cases: tuple, kernels: tuple | None = None) -> tuple[list[Resources], int]:
    """Record and compile the launches of ``cases`` for one target and dot precision, only those of
    ``kernels`` (@triton.jit names) when given: (rows, launches)."""
    launches = record_launches(arch, dtype, cases)
    if kernels:
        unknown = set(kernels) - {launch.name for launch in launches}
        if unknown:
            raise UnknownKernelError(f"no recorded launch of {sorted(unknown)} in {cases} "
                                     f"(kernels launched: {sorted({launch.name for launch in launches})})")
        launches = [launch for launch in launches if launch.name in kernels]
    rows = compile_launches(launches, arch, dtype, progress=True)
    print(f"sm_{arch} {dtype}: {len(launches)} launches compiled", file=sys.stderr, flush=True)
    return rows, len(launches)


def over_budget(rows: list[Resources]) -> list[str]:
    return [f"{r.kernel} sm_{r.arch} {r.dtype} {r.case} [{r.config}]: {r.spill_stores} B spill stores > "
            f"budget {spill_budget(r.kernel, r.dtype)}" for r in rows if r.spill_stores > spill_budget(r.kernel, r.dtype)]


def table(rows: list[Resources]) -> str:
    """Markdown: one line per kernel, arch and dtype, the worst variant over the recorded launches."""
    worst: dict[tuple, Resources] = {}
    variants: dict[tuple, int] = {}
    for r in rows:
        k = (r.kernel, r.arch, r.dtype)
        variants[k] = variants.get(k, 0) + 1
        if k not in worst or (r.spill_stores, r.registers, r.shared) > (worst[k].spill_stores, worst[k].registers,
                                                                         worst[k].shared):
            worst[k] = r
    lines = ["| kernel | arch | dots | variants | worst: registers | spill stores (B) | spill loads (B) | stack (B) "
             "| shared (B) | budget (B) | worst variant |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(worst, key=lambda k: (k[0], -k[1], k[2])):
        r = worst[k]
        lines.append(f"| `{r.kernel}` | sm_{r.arch} | {r.dtype} | {variants[k]} | {r.registers} | {r.spill_stores} "
                     f"| {r.spill_loads} | {r.stack} | {r.shared} | {spill_budget(r.kernel, r.dtype)} "
                     f"| {r.case}: {r.config} |")
    return "\n".join(lines)


_README = Path(__file__).with_name("README.md")
_BEGIN, _END = "<!-- kernel-resources:begin -->", "<!-- kernel-resources:end -->"


def write_readme(text: str, header: str) -> None:
    readme = _README.read_text()
    block = f"{_BEGIN}\n{header}\n\n{text}\n{_END}"
    if _BEGIN in readme:
        readme = re.sub(re.escape(_BEGIN) + ".*?" + re.escape(_END), lambda _: block, readme, flags=re.S)
    else:
        readme = readme.rstrip("\n") + "\n\n## Kernel resources (offline compile, no GPU)\n\n" + block + "\n"
    _README.write_text(readme)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, action="append", choices=sorted(ARCHS), help="compute capability (repeat)")
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="dot precision (repeat)")
    ap.add_argument("--case", action="append", choices=CASES, help="workload (repeat)")
    ap.add_argument("--kernel", action="append", help="compile only the launches of this @triton.jit kernel (repeat)")
    ap.add_argument("--write-readme", action="store_true", help="replace the table in benchmarks/README.md")
    ap.add_argument("--jobs", type=int, default=1,
                    help="(arch, dtype) sweeps run in parallel processes (compiles are single-threaded)")
    ap.add_argument("--save", type=Path, help="also write the compiled rows to this JSON file")
    ap.add_argument("--load", type=Path, help="report rows saved by --save instead of compiling (budgets as now)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.kernel and args.write_readme:
        ap.error("--write-readme writes the whole table: run it without --kernel")
    cases = tuple(args.case or CASES)
    kernels = tuple(args.kernel) if args.kernel else None
    work = [(arch, dtype, cases, kernels) for arch in args.arch or sorted(ARCHS, reverse=True)
            for dtype in args.dtype or list(DTYPES)]
    rows = []
    if args.load:
        import json
        rows = [Resources(**r) for r in json.loads(args.load.read_text())]
        work = []
    try:
        if args.jobs == 1:
            for item in work:
                rows += sweep(*item)[0]
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            from benchmarks import kernel_resources  # by its importable name: this file may run as __main__

            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                for part, _ in pool.map(kernel_resources.sweep, *zip(*work)):
                    rows += part
    except UnknownKernelError as exc:
        ap.error(str(exc))
    if args.save:
        import json
        args.save.write_text(json.dumps([dataclasses.asdict(r) for r in rows]))
    text = table(rows)
    print(text)
    if args.write_readme:
        import triton
        write_readme(text, f"`python -m benchmarks.kernel_resources --write-readme` (triton {triton.__version__}, "
                           f"torch {torch.__version__}): {len(rows)} distinct compiled variants of the launches of "
                           f"{', '.join(cases)}. Registers and spill stores/stack per thread, shared "
                           "memory per program; each line shows the variant with the most spill stores.")
    bad = over_budget(rows)
    for line in bad:
        print("over budget:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
