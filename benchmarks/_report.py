"""Shared machinery of the benchmark suite: machine facts, adaptive round counts, the results
registry the tests fill, and the Markdown summary that ``conftest.py`` prints and writes to
``benchmarks/latest.md`` at the end of a session.

Every number reported is a median over timed rounds that follow untimed warm-up rounds; inputs
are made fresh in each round's ``setup`` (not timed), nothing is cached between rounds.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

HOP_S = 0.02  # the paper's 20 ms hop (docs/conventions.md): one output frame per 20 ms of audio
REPORT_PATH = Path(__file__).with_name("latest.md")

# Reference models compared side by side; ratio = base / dnd_7_10.
BASE, DND = "base", "dnd_7_10"

# GPU figures (the "GPU" section of the summary, rendered only when some were recorded):
# whole models (test_gpu_models.py) and the per-op kernels (test_kernels_dws.py, test_kernels_dilated.py).
GPU_TRAIN, GPU_INFER = "gpu_train_step", "gpu_infer"
GPU_STREAM, GPU_STREAMS = "gpu_stream", "gpu_streams_per_gpu"
KERNEL_DWS = "kernel_dws"
DIL_INFER, DIL_TRAIN, DIL_STEP = "gpu_dilated_inference", "gpu_dilated_training", "gpu_dilated_step"
DIL_STEP_LOGITS = "gpu_dilated_step_logits"
GPU_FIGURES = frozenset({GPU_TRAIN, GPU_INFER, GPU_STREAM, GPU_STREAMS, KERNEL_DWS, DIL_INFER, DIL_TRAIN, DIL_STEP,
                         DIL_STEP_LOGITS})
TRAIN_SPEEDUP_TARGET = 4.5  # issue #5: base / dnd_7_10 triton training step (the paper: 4.45x on a V100)
STREAMS_TARGET = 10_000  # issue #4: real-time dnd_7_10 streams on one H100


def gpu_model_key(model: str, kernels: str, channels_last: bool = False) -> str:
    """record()'s model key of a whole-model GPU variant: "<model> <RTSED_KERNELS>[ channels_last]"."""
    return f"{model} {kernels}" + (" channels_last" if channels_last else "")


# Whole-model GPU variants in table order: (model key, column header, short name for the ratios).
# Ratios are taken against GPU_TRITON, the last one.
GPU_VARIANTS = (
    (gpu_model_key(BASE, "ref"), f"{BASE} (cuDNN, GRU)", BASE),
    (gpu_model_key(DND, "ref"), f"{DND} ref (cuDNN, NCHW)", "ref"),
    (gpu_model_key(DND, "ref", True), f"{DND} ref (cuDNN, channels_last)", "ref CL"),
    (gpu_model_key(DND, "triton"), f"{DND} triton", "triton"),
)
GPU_TRITON = GPU_VARIANTS[-1][0]


# ----------------------------------------------------------------------------------------------
# Machine facts
# ----------------------------------------------------------------------------------------------

_ALLOCATORS = (("tcmalloc", "libtcmalloc"), ("jemalloc", "libjemalloc"), ("mimalloc", "libmimalloc"))


def detect_allocator() -> str:
    """The malloc this process runs with: a caching allocator found in LD_PRELOAD or mapped into
    the process (/proc/self/maps), else glibc malloc. docs/fast-paths.md: it changes big-tensor
    timings by up to 3x, so every report names it."""
    mapped = ""
    try:
        mapped = Path("/proc/self/maps").read_text()
    except OSError:
        pass
    preload = os.environ.get("LD_PRELOAD", "")
    for name, lib in _ALLOCATORS:
        if lib in mapped or lib in preload:
            m = re.search(rf"\S*{lib}\S*", mapped) or re.search(rf"\S*{lib}\S*", preload)
            where = f" ({m.group(0)})" if m else ""
            extra = os.environ.get("MALLOC_CONF") if name == "jemalloc" else None
            return f"{name}{where}" + (f", MALLOC_CONF={extra}" if extra else "")
    tunables = os.environ.get("GLIBC_TUNABLES")
    return "glibc malloc" + (f" (GLIBC_TUNABLES={tunables})" if tunables else "")


def _cpu_model() -> tuple[str, bool]:
    model, avx512 = platform.processor() or "unknown", False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, avx512
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    if m:
        model = m.group(1).strip()
    m = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    if m:
        avx512 = "avx512f" in m.group(1).split()
    return model, avx512


def load_average() -> float | None:
    """1-minute load average: other processes on a shared machine inflate every timing."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    model, avx512 = _cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "cpu": model,
        "avx512": avx512,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "allocator": detect_allocator(),
        "kernels_backend": os.environ.get("RTSED_KERNELS", "auto"),
        "load_avg_1min": load_average(),
    }


def _fmt_load(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def measure(benchmark, target: Callable[..., Any], setup: Callable[[], tuple], *, budget_s: float,
            min_rounds: int, max_rounds: int, warmup_rounds: int) -> None:
    """Time ``target(*args)`` with pytest-benchmark's pedantic mode, one call per round.

    ``setup()`` returns ``(args, kwargs)`` for one round and is not timed. Warm-up rounds run
    first, untimed by the statistics (the last one is clocked here only to choose how many timed
    rounds fit ``budget_s``: clamp(budget / warm-up time, min_rounds, max_rounds)).
    ``RTSED_BENCH_BUDGET_SCALE`` scales every budget (e.g. 0.2 for a quick pass, 5 for a careful one).
    """
    budget_s *= _env_float("RTSED_BENCH_BUDGET_SCALE", 1.0)
    per_call = None
    for _ in range(max(1, warmup_rounds)):
        args, kwargs = setup()
        start = time.perf_counter()
        target(*args, **kwargs)
        per_call = time.perf_counter() - start
    assert per_call is not None
    rounds = int(min(max_rounds, max(min_rounds, math.floor(budget_s / max(per_call, 1e-9)))))
    benchmark.extra_info["load_avg_1min_before"] = load_average()
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    benchmark.extra_info["load_avg_1min_after"] = load_average()


# ----------------------------------------------------------------------------------------------
# Results registry (filled by the tests, read by the session summary)
# ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    figure: str  # key of FIGURES or "stream"
    model: str
    name: str  # the pytest-benchmark test name
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    iqr_s: float | None = None
    rounds: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


RESULTS: list[Result] = []


def record(benchmark, figure: str, model: str,
           derive: Callable[[float], dict[str, Any]] | None = None, **static: Any) -> Result:
    """Copy the benchmark's statistics and domain units into the registry and into
    ``benchmark.extra_info`` (so they also land in --benchmark-json). ``derive(median_s)`` turns
    the median into domain units; a disabled benchmark (--benchmark-disable) has no statistics,
    so only ``static`` values are kept then."""
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    res = Result(figure, model, benchmark.name)
    if stats is not None and getattr(stats, "rounds", 0):
        res.median_s, res.min_s, res.max_s, res.iqr_s = stats.median, stats.min, stats.max, stats.iqr
        res.rounds = stats.rounds
    benchmark.extra_info.update(static)
    if derive is not None and res.median_s is not None:
        benchmark.extra_info.update(derive(res.median_s))
    res.extra = dict(benchmark.extra_info)
    RESULTS.append(res)
    return res


# ----------------------------------------------------------------------------------------------
# Markdown summary
# ----------------------------------------------------------------------------------------------


def _fmt_int(v: float | None) -> str:
    return "-" if v is None else f"{round(v):,}"


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g} s" if v >= 0.1 else f"{v * 1e3:.3g} ms"


def _fmt_t(v: float | None) -> str:
    """A duration in s, ms or us (GPU figures span microseconds to seconds)."""
    if v is None:
        return "-"
    if v >= 1.0:
        return f"{v:.3g} s"
    return f"{v * 1e3:.3g} ms" if v >= 1e-3 else f"{v * 1e6:.3g} us"


def _fmt_num(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _find(figure: str, model: str) -> Result | None:
    found = [r for r in RESULTS if r.figure == figure and r.model == model]
    return found[-1] if found else None


def _value(figure: str, model: str, key: str) -> float | None:
    r = _find(figure, model)
    return None if r is None else r.extra.get(key)


def render_markdown(header: dict[str, Any], end_load: float | None, wall_s: float | None) -> str:
    offline_threads = next((r.extra.get("threads") for r in RESULTS if r.figure == "offline"), "-")
    train_threads = next((r.extra.get("threads") for r in RESULTS if r.figure == "train_step"), "-")
    lines = [
        "# rtsed benchmarks (latest run)",
        "",
        f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"- CPU: {header['cpu']} (AVX-512: {'yes' if header['avx512'] else 'no'}), "
        f"{header['usable_cpus']} usable of {header['logical_cpus']} logical CPUs",
        f"- torch {header['torch']}, Python {header['python']}, RTSED_KERNELS={header['kernels_backend']}",
        f"- allocator: **{header['allocator']}**",
        f"- threads: offline inference {offline_threads}, train step {train_threads}, streaming 1 "
        f"(torch default here: {header['torch_threads_default']})",
        f"- 1-min load average at start / end: {_fmt_load(header['load_avg_1min'])} / {_fmt_load(end_load)} "
        "(above the core count means other processes shared the CPU and inflated the times)",
    ]
    if wall_s is not None:
        lines.append(f"- suite wall time: {wall_s:.0f} s")
    lines += [
        "",
        "Medians over timed rounds after warm-up; random inputs made fresh per round (untimed).",
    ]
    # A run of GPU benchmarks only has nothing for the CPU table: leave it out then.
    if any(r.figure not in GPU_FIGURES for r in RESULTS) or not RESULTS:
        lines += _cpu_table(offline_threads, train_threads)
    lines += _stream_and_spread_tables()
    lines += _gpu_section()
    return "\n".join(lines) + "\n"


def _cpu_table(offline_threads: Any, train_threads: Any) -> list[str]:
    lines = [
        "",
        f"| figure | {BASE} | {DND} | ratio ({BASE}/{DND}) |",
        "|---|---|---|---|",
    ]
    rows = [
        ("parameters", "params", "params", _fmt_int),
        ("multiply-accumulates per output frame", "macs", "macs_per_frame", _fmt_int),
        (f"offline inference, batch 16 x 1024, frames/s ({offline_threads} threads)",
         "offline", "frames_per_second", _fmt_int),
        ("offline inference, time per batch", "offline", "seconds_per_batch", _fmt_s),
        ("offline inference, --precision bf16, frames/s", "offline_bf16", "frames_per_second", _fmt_int),
        (f"train step (forward, BCE, backward, Adam), time per batch 16 x 1024 "
         f"({train_threads} threads)", "train_step", "seconds_per_batch", _fmt_s),
        ("train step, frames/s", "train_step", "frames_per_second", _fmt_int),
        ("train step through train.fit's train_step, fp32", "train_step_fit_fp32", "seconds_per_batch", _fmt_s),
        ("train step through train.fit's train_step, --precision bf16", "train_step_fit_bf16",
         "seconds_per_batch", _fmt_s),
    ]
    for label, figure, key, fmt in rows:
        a, b = _value(figure, BASE, key), _value(figure, DND, key)
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {_ratio(a, b)} |")
    return lines


def _stream_and_spread_tables() -> list[str]:
    lines: list[str] = []
    streams = [r for r in RESULTS if r.figure == "stream"]
    if streams:
        lines += [
            "",
            f"Streaming: one stream, 1 thread, `ModelStream.push` of one chunk of new frames after the "
            f"lookahead has filled; RTF = compute time / audio time ({HOP_S * 1e3:.0f} ms per frame), "
            "streams per core = 1 / RTF.",
            "",
            "| model | frames/step | us per frame | ms per step | RTF | streams per core |",
            "|---|---|---|---|---|---|",
        ]
        order = {m: i for i, m in reversed(list(enumerate(r.model for r in streams)))}
        for r in sorted(streams, key=lambda r: (r.extra.get("frames_per_step", 0), order[r.model])):
            e = r.extra
            if "us_per_frame" not in e:
                continue
            lines.append(
                f"| {r.model} | {e['frames_per_step']} | {e['us_per_frame']:,.0f} | "
                f"{e['ms_per_step']:.3g} | {e['real_time_factor']:.4f} | {e['streams_per_core']:,.1f} |"
            )

    offline_onnx = [r for r in RESULTS if r.figure == "offline_onnx" and "frames_per_second" in r.extra]
    if offline_onnx:
        lines += ["", "Offline onnxruntime graph (one minute of frames, batch 1):", "",
                  "| model | threads | frames/s |", "|---|---|---|"]
        lines += [f"| {r.model} | {r.extra['threads']} | {r.extra['frames_per_second']:,.0f} |" for r in offline_onnx]

    timed = [r for r in RESULTS if r.median_s is not None and r.figure not in ("params", "macs")]
    if timed:
        lines += [
            "",
            "Spread of every timed case (IQR = interquartile range):",
            "",
            "| case | rounds | median | min | max | IQR / median | load avg before |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in timed:
            rel = "-" if not r.median_s else f"{100 * (r.iqr_s or 0) / r.median_s:.1f} %"
            load = r.extra.get("load_avg_1min_before")
            lines.append(
                f"| {r.name} | {r.rounds} | {_fmt_s(r.median_s)} | {_fmt_s(r.min_s)} | "
                f"{_fmt_s(r.max_s)} | {rel} | {_fmt_load(load)} |"
            )
    return lines


# ----------------------------------------------------------------------------------------------
# GPU section (whole models and per-op kernels); every ratio is computed here from the medians
# ----------------------------------------------------------------------------------------------


def _fmt_gb(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} GB"


def _grouped(figures: tuple[str, ...], row_of: Callable[[Result], tuple],
             col_of: Callable[[Result], str]) -> dict[tuple, dict[str, Result]]:
    """Results of ``figures`` as {row key: {column: latest result}}, rows in first-seen order."""
    rows: dict[tuple, dict[str, Result]] = {}
    for r in RESULTS:
        if r.figure in figures:
            rows.setdefault(row_of(r), {})[col_of(r)] = r
    return rows


def _median(r: Result | None) -> float | None:
    return None if r is None else r.median_s


def _extra(r: Result | None, key: str) -> Any:
    return None if r is None else r.extra.get(key)


def _model_part(r: Result, index: int, default: str = "-") -> str:
    """Field ``index`` of a space- or slash-separated model key (for results without the extras)."""
    parts = r.model.replace("/", " ").split()
    return parts[index] if len(parts) > index else default


def _gpu_section() -> list[str]:
    gpu = [r for r in RESULTS if r.figure in GPU_FIGURES]
    if not gpu:
        return []
    devices = sorted({str(r.extra["device"]) for r in gpu if r.extra.get("device")})
    lines = ["", "## GPU", "", f"- GPU: {', '.join(devices) or '-'}"]
    flags = next((r.extra for r in gpu if "cudnn_allow_tf32" in r.extra), None)
    if flags is not None:
        lines.append(
            f"- whole-model fp32 runs with torch's defaults: cudnn.allow_tf32={flags['cudnn_allow_tf32']} "
            f"(cuDNN convs and GRU, and the Triton kernels' dots, may use TF32), "
            f"cuda.matmul.allow_tf32={flags.get('matmul_allow_tf32')}, cudnn.benchmark={flags.get('cudnn_benchmark')}"
        )
    lines.append("- every round ends with torch.cuda.synchronize(); ratios below are computed from the medians")
    for table in (_gpu_model_table, _gpu_stream_table, _gpu_streams_table, _kernel_dws_table,
                  _kernel_dilated_table, _kernel_dilated_step_table, _kernel_dilated_step_logits_table):
        lines += table()
    return lines


def _gpu_model_table() -> list[str]:
    found = [r for r in RESULTS if r.figure in (GPU_TRAIN, GPU_INFER)]
    if not found:
        return []
    e = found[0].extra
    others = GPU_VARIANTS[:-1]
    lines = [
        "",
        f"Whole models, batch {e.get('batch', '-')} x {e.get('frames', '-')} frames x {e.get('n_mels', '-')} "
        "mels, fp32. Ratio columns: the other variant's time (or memory) over dnd_7_10 triton's, "
        "or triton's frames/s over the other's: > 1 means triton is better.",
        "",
        "| figure | " + " | ".join(h for _, h, _ in GPU_VARIANTS) + " | "
        + " | ".join(f"{short} / triton" for _, _, short in others) + " |",
        "|---" * (1 + len(GPU_VARIANTS) + len(others)) + "|",
    ]
    rows = [  # (label, figure, extra key or None for the median, format, higher is better)
        ("training step (zero_grad, forward, BCE, backward, Adam), time per batch", GPU_TRAIN, None, _fmt_t, False),
        ("training step, frames/s", GPU_TRAIN, "frames_per_second", _fmt_int, True),
        ("training step, peak GPU memory", GPU_TRAIN, "peak_memory_gb", _fmt_gb, False),
        ("inference (eval, inference_mode), time per batch", GPU_INFER, None, _fmt_t, False),
        ("inference, frames/s", GPU_INFER, "frames_per_second", _fmt_int, True),
    ]
    for label, figure, key, fmt, higher_better in rows:
        values = {}
        for model, _, _ in GPU_VARIANTS:
            r = _find(figure, model)
            values[model] = _median(r) if key is None else _extra(r, key)
        if all(v is None for v in values.values()):
            continue
        t = values[GPU_TRITON]
        ratios = [_ratio(t, values[m]) if higher_better else _ratio(values[m], t) for m, _, _ in others]
        lines.append(f"| {label} | " + " | ".join(fmt(values[m]) for m, _, _ in GPU_VARIANTS) + " | "
                     + " | ".join(ratios) + " |")
    base, tri = _median(_find(GPU_TRAIN, GPU_VARIANTS[0][0])), _median(_find(GPU_TRAIN, GPU_TRITON))
    if base is not None and tri:
        met = "met" if base / tri >= TRAIN_SPEEDUP_TARGET else "NOT met"
        lines += ["", f"Training-step target (issue #5): {BASE} / {DND} triton >= {TRAIN_SPEEDUP_TARGET} "
                      f"(the paper: 4.45x on a V100): measured {_ratio(base, tri)}, {met}."]
    return lines


def _gpu_stream_table() -> list[str]:
    rows = _grouped((GPU_STREAM,),
                    lambda r: (r.extra.get("model_name", _model_part(r, 0)), r.extra.get("kernels", _model_part(r, 1)),
                               r.extra.get("frames_per_step", 0)),
                    lambda r: r.extra.get("mode", _model_part(r, 3)))
    if not rows:
        return []
    lines = [
        "",
        "Streaming latency on the GPU: one stream (batch 1), `ModelStream` after its lookahead has filled, "
        "input frames already on the GPU. eager push = `push` (step + selection of the valid rows); eager "
        "step = `step`; CUDA graph = replay of the captured step (test_gpu_models.py says what it covers). "
        f"RTF = time per step / audio per step ({HOP_S * 1e3:.0f} ms per frame).",
        "",
        "| model | kernels | frames/step | eager push | eager step | CUDA graph | eager step / graph "
        "| RTF eager step | RTF graph |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {k: i for i, k in enumerate(rows)}
    for key in sorted(rows, key=lambda k: (k[2], order[k])):
        name, kernels, n = key
        cols = rows[key]
        push, step, graph = (_median(cols.get(m)) for m in ("eager_push", "eager_step", "cuda_graph"))
        audio = HOP_S * n if n else None
        rtf = [None if t is None or not audio else t / audio for t in (step, graph)]
        lines.append(f"| {name} | {kernels} | {n} | {_fmt_t(push)} | {_fmt_t(step)} | {_fmt_t(graph)} | "
                     f"{_ratio(step, graph)} | {_fmt_num(rtf[0])} | {_fmt_num(rtf[1])} |")
    return lines


def _gpu_streams_table() -> list[str]:
    found = [r for r in RESULTS if r.figure == GPU_STREAMS]
    if not found:
        return []
    lines = [
        "",
        "Many streams on one GPU: N streams stepped together, one batched `ModelStream.step` of "
        "n new frames each (eager). RTF = step time / (n x 20 ms of audio); the N streams keep up "
        "with real time when RTF <= 1; real-time streams per GPU (est.) = N / RTF, an extrapolation "
        "beyond the N measured when RTF < 1.",
        "",
        "| model | kernels | streams | frames/step | time per step | RTF | keeps up | real-time streams "
        "per GPU (est.) | peak memory | ref / this |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    best: dict[str, int] = {}
    for r in found:
        e = r.extra
        name, kernels = e.get("model_name", _model_part(r, 0)), e.get("kernels", _model_part(r, 1))
        n_streams, n = e.get("streams"), e.get("frames_per_step")
        t = r.median_s
        rtf = None if t is None or not n else t / (n * HOP_S)
        keeps = "-" if rtf is None else ("yes" if rtf <= 1 else "no")
        est = None if rtf is None or not n_streams else n_streams / rtf
        if rtf is not None and rtf <= 1 and n_streams:
            best[kernels] = max(best.get(kernels, 0), n_streams)
        ref = next((x for x in found if x.extra.get("kernels") == "ref" and x.extra.get("streams") == n_streams
                    and x.extra.get("model_name") == e.get("model_name")), None)
        ratio = "-" if kernels == "ref" else _ratio(_median(ref), t)
        lines.append(f"| {name} | {kernels} | {_fmt_int(n_streams)} | {n} | {_fmt_t(t)} | {_fmt_num(rtf)} | "
                     f"{keeps} | {_fmt_int(est)} | {_fmt_gb(e.get('peak_memory_gb'))} | {ratio} |")
    if best:
        kept = ", ".join(f"{k}: {v:,}" for k, v in best.items())
        lines += ["", f"Issue #4 target: {STREAMS_TARGET:,} real-time streams on an H100. Largest N measured "
                      f"that keeps up: {kept}."]
    return lines


def _impl_table(caption: str, label_headers: list[str], rows: dict[tuple, dict[str, Result]],
                impls: list[tuple[str, str]], fast: str, gbps_key: str, tflops_key: str) -> list[str]:
    """One row per key: each implementation's median, slower-impl / fast-impl ratios, and the fast
    implementation's throughput (effective GB/s, TFLOP/s from extra_info)."""
    fast_header = dict(impls)[fast]
    slow = [(i, h) for i, h in impls if i != fast]
    lines = [
        "",
        caption,
        "",
        "| " + " | ".join(label_headers + [h for _, h in impls] + [f"{h} / {fast_header}" for _, h in slow]
                         + [f"{fast_header} GB/s", f"{fast_header} TFLOP/s"]) + " |",
        "|---" * (len(label_headers) + len(impls) + len(slow) + 2) + "|",
    ]
    for key, cols in rows.items():
        f = _median(cols.get(fast))
        cells = [str(k) for k in key] + [_fmt_t(_median(cols.get(i))) for i, _ in impls]
        cells += [_ratio(_median(cols.get(i)), f) for i, _ in slow]
        cells += [_fmt_num(_extra(cols.get(fast), gbps_key)), _fmt_num(_extra(cols.get(fast), tflops_key))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


_CUDNN_IMPLS = [("cudnn_nchw", "cuDNN NCHW"), ("cudnn_channels_last", "cuDNN channels_last"), ("triton", "Triton")]


def _kernel_dws_table() -> list[str]:
    rows = _grouped((KERNEL_DWS,),
                    lambda r: (r.extra.get("block", _model_part(r, 0)), r.extra.get("mode", _model_part(r, 1)),
                               r.extra.get("dtype", _model_part(r, 2))),
                    lambda r: r.extra.get("impl", _model_part(r, 3)))
    if not rows:
        return []
    return _impl_table("Fused DWS block (kernels/dws_block.py) vs cuDNN, batch 16 x 1024 frames, 256 channels "
                       "(test_kernels_dws.py; fp32 with torch's default TF32 settings):",
                       ["block", "mode", "dtype"], rows, _CUDNN_IMPLS, "triton",
                       "effective_gb_per_s", "model_tflop_per_s")


def _kernel_dilated_table() -> list[str]:
    modes = {DIL_INFER: "inference", DIL_TRAIN: "training (fwd + bwd)"}
    rows = _grouped((DIL_INFER, DIL_TRAIN),
                    lambda r: (modes[r.figure], r.extra.get("precision", _model_part(r, 1))),
                    lambda r: r.extra.get("impl", _model_part(r, 0)))
    if not rows:
        return []
    return _impl_table("f_dil 7|10 conv + ReLU + BN (kernels/dilated_temporal.py) vs cuDNN, batch 16 x 1024 "
                       "frames (test_kernels_dilated.py; fp32 = TF32 off, tf32 = on, on both sides):",
                       ["mode", "precision"], rows, _CUDNN_IMPLS, "triton", "gb_per_s_effective", "tflops_useful")


def _ring_step_rows(figure: str) -> dict[tuple, dict[str, Result]]:
    """A ring-step figure's results by (streams, frames per step), one column per implementation."""
    return _grouped((figure,),
                    lambda r: (r.extra.get("streams", "-"), r.extra.get("frames_per_step", "-")),
                    lambda r: r.extra.get("impl", _model_part(r, 0)))


def _kernel_dilated_step_table() -> list[str]:
    rows = _ring_step_rows(DIL_STEP)
    if not rows:
        return []
    lines = [
        "",
        "f_dil 7|10 streaming ring step (kernels/dilated_step.py) vs stock torch, fp32 (TF32 off):",
        "",
        "| streams | frames/step | torch | Triton | torch / Triton | Triton per frame |",
        "|---|---|---|---|---|---|",
    ]
    for (streams, n), cols in rows.items():
        torch_t, tri = _median(cols.get("torch")), _median(cols.get("triton"))
        per_frame = None
        if tri is not None and isinstance(streams, int) and isinstance(n, int) and streams * n:
            per_frame = tri / (streams * n)
        lines.append(f"| {streams} | {n} | {_fmt_t(torch_t)} | {_fmt_t(tri)} | {_ratio(torch_t, tri)} | "
                     f"{_fmt_t(per_frame)} |")
    return lines


def _kernel_dilated_step_logits_table() -> list[str]:
    rows = _ring_step_rows(DIL_STEP_LOGITS)
    if not rows:
        return []
    lines = [
        "",
        "f_dil 7|10 ring step + 16-class classifier, fused (kernels/dilated_step_logits.py) vs the ring step "
        "then F.linear, fp32 (TF32 off); memory: the step's peak beyond the ring and its input:",
        "",
        "| streams | frames/step | step then linear | fused | unfused / fused | memory, step then linear | memory, fused |",
        "|---|---|---|---|---|---|---|",
    ]
    for (streams, n), cols in rows.items():
        unfused, fused = cols.get("step_then_linear"), cols.get("fused")
        memory = [_extra(r, "peak_step_memory_gb") for r in (unfused, fused)]
        lines.append(f"| {_fmt_int(streams) if isinstance(streams, int) else streams} | {n} | "
                     f"{_fmt_t(_median(unfused))} | {_fmt_t(_median(fused))} | {_ratio(_median(unfused), _median(fused))} | "
                     + " | ".join("-" if m is None else f"{m:.3g} GB" for m in memory) + " |")
    return lines
