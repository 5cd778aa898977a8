"""Benchmark session plumbing: seeds, thread control, machine facts in the header, and the
Markdown summary (printed after pytest-benchmark's own tables and written to benchmarks/latest.md).
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from benchmarks import _report
from benchmarks._gpu import OOM_SKIPS, skip_on_oom
from rtsed.backends.allocator import ensure_caching_allocator



def pytest_configure(config) -> None:
    """Big-tensor figures (train steps, batch-16 inference) depend on the allocator more than on
    the model code (docs/fast-paths.md): run them as a user of train.fit would, under tcmalloc/jemalloc
    when installed (the process re-executes itself once with LD_PRELOAD; RTSED_ALLOCATOR=system
    opts out). pytest has already redirected stdout/stderr into its capture files by now, so they
    are restored first, or the re-executed run would print into a file nobody reads."""
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()
    ensure_caching_allocator()  # returns only when no re-execution was needed
    if capture is not None:
        capture.start_global_capturing()

_session: dict = {}


def pytest_sessionstart(session) -> None:
    _session["start"] = time.perf_counter()
    _session["header"] = _report.machine_info()


def pytest_report_header(config) -> list[str]:
    info = _session.get("header") or _report.machine_info()
    return [
        f"rtsed benchmarks: {info['cpu']} ({info['usable_cpus']} usable CPUs, AVX-512 "
        f"{'yes' if info['avx512'] else 'no'}), torch {info['torch']}, "
        f"{info['torch_threads_default']} torch threads, allocator: {info['allocator']}, "
        f"load avg {info['load_avg_1min']}",
    ]


@pytest.fixture(autouse=True)
def _seeded():
    """Every benchmark starts from the same seeds, so its random weights and inputs repeat."""
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def torch_threads():
    """Call with n to set torch's intra-op threads for this test; restored afterwards."""
    before = torch.get_num_threads()

    def set_threads(n: int | None) -> int:
        if n is not None:
            torch.set_num_threads(n)
        return torch.get_num_threads()

    yield set_threads
    torch.set_num_threads(before)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Every case, CPU or GPU: an out-of-memory error skips it with the reason (benchmarks/_gpu.py),
    so one case too big for the device does not fail the run or the cases after it."""
    with skip_on_oom(item.nodeid):
        return (yield)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter) -> None:
    for test_id, why in OOM_SKIPS:
        terminalreporter.write_line(f"skipped for want of memory: {test_id}: {why}")
    if not _report.RESULTS:
        return
    wall = time.perf_counter() - _session["start"] if "start" in _session else None
    text = _report.render_markdown(_session.get("header") or _report.machine_info(),
                                   _report.load_average(), wall)
    _report.REPORT_PATH.write_text(text)
    terminalreporter.write_sep("=", "rtsed benchmark summary (Markdown)")
    terminalreporter.write_line(text)
    terminalreporter.write_line(f"(written to {_report.REPORT_PATH})")
