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

HOP_S = 0.02  # the paper's 20 ms hop (DESIGN.md): one output frame per 20 ms of audio
REPORT_PATH = Path(__file__).with_name("latest.md")

# Reference models compared side by side; ratio = base / dnd_7_10.
BASE, DND = "base", "dnd_7_10"


# ----------------------------------------------------------------------------------------------
# Machine facts
# ----------------------------------------------------------------------------------------------

_ALLOCATORS = (("tcmalloc", "libtcmalloc"), ("jemalloc", "libjemalloc"), ("mimalloc", "libmimalloc"))


def detect_allocator() -> str:
    """The malloc this process runs with: a caching allocator found in LD_PRELOAD or mapped into
    the process (/proc/self/maps), else glibc malloc. PERFORMANCE.md: it changes big-tensor
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
    train_threads = next((r.extra.get("threads") for r in RESULTS if r.figure == "fwd_bwd"), "-")
    lines = [
        "# rtsed benchmarks (latest run)",
        "",
        f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"- CPU: {header['cpu']} (AVX-512: {'yes' if header['avx512'] else 'no'}), "
        f"{header['usable_cpus']} usable of {header['logical_cpus']} logical CPUs",
        f"- torch {header['torch']}, Python {header['python']}, RTSED_KERNELS={header['kernels_backend']}",
        f"- allocator: **{header['allocator']}**",
        f"- threads: offline inference {offline_threads}, forward+backward {train_threads}, streaming 1 "
        f"(torch default here: {header['torch_threads_default']})",
        f"- 1-min load average at start / end: {_fmt_load(header['load_avg_1min'])} / {_fmt_load(end_load)} "
        "(above the core count means other processes shared the CPU and inflated the times)",
    ]
    if wall_s is not None:
        lines.append(f"- suite wall time: {wall_s:.0f} s")
    lines += [
        "",
        "Medians over timed rounds after warm-up; random inputs made fresh per round (untimed).",
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
        (f"forward + BCE loss + backward, time per batch 16 x 1024 (train mode, no optimizer, "
         f"{train_threads} threads)", "fwd_bwd", "seconds_per_batch", _fmt_s),
        ("forward + BCE loss + backward, frames/s", "fwd_bwd", "frames_per_second", _fmt_int),
    ]
    for label, figure, key, fmt in rows:
        a, b = _value(figure, BASE, key), _value(figure, DND, key)
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {_ratio(a, b)} |")

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
    return "\n".join(lines) + "\n"
