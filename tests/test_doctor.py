"""``python -m rtsed.doctor``: it runs, and what it prints follows RTSED_KERNELS and RTSED_NATIVE
(the choices come from rtsed.backends.dispatch itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rtsed.backends import native
from rtsed.cli import doctor

REPO = Path(__file__).resolve().parents[1]


def _section(report: str, title: str) -> dict[str, str]:
    """{op: implementation} of one "device, mode:" section of the report."""
    lines = report.splitlines()
    start = lines.index(title) + 1
    rows = {}
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        parts = [p for p in line.strip().split("  ") if p]
        rows[parts[0].strip()] = parts[1].strip()
    return rows


def test_module_path_runs_and_names_everything():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "rtsed.doctor"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for name in ("RTSED_KERNELS", "RTSED_NATIVE", "torch", "CUDA", "triton", "threads", "allocator",
                 "C++ compiler", "native kernels", "bf16", "onnxruntime"):
        assert f"  {name}" in out, name
    for title in ("cpu, inference:", "cpu, streaming step:", "cpu, training:", "cpu, bf16 inference:",
                  "cpu, ONNX export:"):
        assert title in out


def test_ref_makes_every_op_the_reference(monkeypatch):
    monkeypatch.setenv("RTSED_KERNELS", "ref")
    report = doctor.report()
    assert "RTSED_KERNELS   ref" in report
    for title in ("cpu, inference:", "cpu, streaming step:", "cpu, training:"):
        rows = _section(report, title)
        assert {op: impl for op, impl in rows.items() if not op.startswith("gemm")} == \
            {op: "reference" for op in rows if not op.startswith("gemm")}, title
    assert "RTSED_KERNELS=ref asks for the reference" in report


def test_native_switch_shows_in_the_choices(monkeypatch):
    monkeypatch.setenv("RTSED_KERNELS", "auto")
    monkeypatch.setenv("RTSED_NATIVE", "0")
    report = doctor.report()
    assert "native kernels  off (RTSED_NATIVE=0)" in report
    inference = _section(report, "cpu, inference:")
    assert inference["frequency_block (dws)"] == "cpu-folded"
    assert inference["dilated_head"] == "cpu-train"  # the chunked path, its passes in torch
    assert _section(report, "cpu, ONNX export:")["frequency_block (dws)"] == "onnx-folded"
    monkeypatch.setenv("RTSED_NATIVE", "1")
    if not native.available():
        pytest.skip("no C++ compiler to build rtsed.backends.native")
    report = doctor.report()
    inference = _section(report, "cpu, inference:")
    assert inference["frequency_block (dws)"] == "native"
    assert inference["dilated_head"] == "native"
    assert _section(report, "cpu, streaming step:")["dilated_step_logits"] == "native"
    assert _section(report, "cpu, training:")["frequency_block (dws)"] == "cpu-train"
    assert _section(report, "cpu, bf16 inference:")["gemm 640x256 @ 256x256"] == "onednn-bf16"


def test_triton_where_it_cannot_run_is_reported_as_an_error(monkeypatch):
    monkeypatch.setenv("RTSED_KERNELS", "triton")
    report = doctor.report()
    assert "error: RTSED_KERNELS=triton" in report
