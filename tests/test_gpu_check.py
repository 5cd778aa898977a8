"""benchmarks/gpu_check.sh, the one command for a GPU machine, in its dry mode (no installs, no GPU
steps): it must write its files into $OUT, record every step with its exit status, and go on
after a failing or timed-out step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["env", "versions", "nvidia-smi", "tests", "bench-test_kernels_dilated", "bench-test_kernels_dws",
         "bench-test_gpu_models"]


def _run(out: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict[str, list[str]]]:
    full_env = {**os.environ, "OUT": str(out), "GPU_CHECK_PYTHON": sys.executable, **env}
    full_env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=300)
    lines = (out / "steps.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["step", "exit", "seconds", "limit_s", "note"]
    steps = {line.split("\t")[0]: line.split("\t")[1:] for line in lines[1:]}
    return proc, steps


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_dry_run_writes_every_file_and_records_each_step(tmp_path):
    out = tmp_path / "out"
    proc, steps = _run(out)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert set(files) >= {"steps.tsv", "log.txt", "versions.txt", "nvidia-smi.txt", "tests.xml", "bench.json",
                          "summary.txt"}
    assert list(steps) == STEPS
    assert steps["env"][0] == "-" and "dry run" in steps["env"][3]
    assert all(steps[name][0] == "-" for name in STEPS if name.startswith("bench-"))
    versions = (out / "versions.txt").read_text()
    assert f"torch {torch.__version__}" in versions and "python " in versions and "git " in versions
    # The collect-only pass finds the compiled-kernel test: the GPU run's selection is not empty.
    assert steps["tests"][0] == "0", (out / "log.txt").read_text()
    assert "test_compiled_on_gpu_matches_reference" in (out / "log.txt").read_text()
    ET.parse(out / "tests.xml")
    assert json.loads((out / "bench.json").read_text()) == {
        "test_kernels_dilated": None, "test_kernels_dws": None, "test_gpu_models": None}
    # Without nvidia-smi that step fails (127), is recorded, and the run still goes on to the tests.
    has_smi = shutil.which("nvidia-smi") is not None
    assert steps["nvidia-smi"][0] == ("0" if has_smi else "127")
    assert proc.returncode == (0 if has_smi else 1), proc.stdout + proc.stderr
    assert ("nvidia-smi(127)" in (out / "summary.txt").read_text()) != has_smi


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_spent_budget_stops_steps_and_says_so(tmp_path):
    """With a 7 s budget, a step gets at most what is left (less 5 s of margin) and the steps after
    the budget are recorded as not run; the run still ends with its summary."""
    out = tmp_path / "out"
    proc, steps = _run(out, GPU_CHECK_BUDGET_S="7")
    assert proc.returncode == 1
    assert list(steps) == STEPS
    assert int(steps["versions"][2]) <= 2  # its limit, not the usual 40 s
    assert steps["tests"][0] == "budget" and "budget is spent" in steps["tests"][3]
    assert (out / "summary.txt").read_text().startswith("gpu_check: dry run")
