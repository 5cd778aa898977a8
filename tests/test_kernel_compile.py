"""The Triton kernels compile for sm_90 and sm_80 without a GPU, within their spill budgets.

benchmarks/kernel_resources.py records the launchers' real launches (GPU tile tables, training,
eval and ring-step shapes) and compiles them offline. A compile takes 10-90 s on 2 cores, so by
default this file compiles a representative few; RTSED_KERNEL_COMPILE=all compiles every recorded
launch for both targets and all dot precisions (what ``python -m benchmarks.kernel_resources``
does, its table in benchmarks/README.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Found, not imported: triton must not be imported in this process before the interpreter tests set
# TRITON_INTERPRET=1 (triton.language's own @jit helpers read it when triton is first imported; tl.zeros
# imported without it cannot run inside interpreted kernels). The compiles run in a child process.
_triton = importlib.util.find_spec("triton")
if _triton is None or _triton.origin is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not (Path(_triton.origin).parent / "backends" / "nvidia" / "compiler.py").is_file():
    pytest.skip("triton has no NVIDIA backend: it cannot target sm_90", allow_module_level=True)

from benchmarks.kernel_resources import Resources, over_budget, spill_budget

ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("RTSED_KERNEL_COMPILE", "") == "all"

# Run in a child: the kernels must be imported as JIT functions (TRITON_INTERPRET unset), while
# the rest of the suite imports them interpreted.
_CHILD = r"""
import dataclasses, json, sys
from benchmarks.kernel_resources import CASES, DTYPES, compile_launches, record_launches
spec = json.loads(sys.argv[1])
out = {"rows": [], "recorded": {}}
for arch, dtype, case, kernels in spec:
    launches = record_launches(arch, dtype, (case,))
    out["recorded"][f"{arch} {dtype} {case}"] = sorted({l.name for l in launches})
    if kernels is not None:  # the first launch of each named kernel whose constexprs match, only
        launches = [next(l for l in launches if l.name == k and all(l.kwargs.get(a) == v for a, v in match.items()))
                    for k, match in kernels]
    out["rows"] += [dataclasses.asdict(r) for r in compile_launches(launches, arch, dtype)]
print(json.dumps(out))
"""

# (arch, dots, workload, [(kernel, constexprs its launch must have)]): sm_90 ring step in fp16 and
# TF32 at 1 stream x 1 frame (the launch a live stream makes every hop), alone and fused with the
# classifier (what a streaming model runs), the eval-mode fused DWS block, sm_80's ring step in fp16
# and its fused step at K = 5 with a full 64-frame tile (held to 128 registers, it spilled at 8 warps),
# and in TF32 training the kernels whose tiles were sized to stop spills, each where it needs the most
# registers (too large a tile makes them spill): f_dil's row-reducing backward kernels on sm_90, its
# statistics and dpatch kernels and the DWS blocks 2-3 depthwise backward on sm_80.
_SUBSET = [
    (90, "fp16", "ring", [("_dilated_step_kernel", {}), ("_dws_fwd_kernel", {})]),
    (90, "fp32-tf32", "ring", [("_dilated_step_kernel", {}), ("_dilated_step_logits_kernel", {})]),
    (80, "fp16", "ring", [("_dilated_step_kernel", {}), ("_dilated_step_logits_kernel", {"K": 5, "BLOCK_F": 64})]),
    (90, "fp32-tf32", "train", [("_dilated_temporal_bwd_dw_kernel", {"K": 5}),
                                ("_dilated_temporal_bwd_stats_kernel", {"K": 7})]),
    (80, "fp32-tf32", "train", [("_dilated_temporal_stats_kernel", {"K": 7}),
                                ("_dilated_temporal_bwd_dpatch_kernel", {"K": 5}),
                                ("_dws_bwd_dd_kernel", {"ONE_IN": False})]),
]
_FULL = [(arch, dtype, case, None) for arch in (90, 80) for dtype in ("fp32-ieee", "fp32-tf32", "fp16")
         for case in ("train", "eval", "ring")]


def _compile(spec) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"offline compile failed:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled() -> dict:
    return _compile(_FULL if FULL else _SUBSET)


def test_every_kernel_is_launched_by_some_workload(compiled):
    """A kernel no recorded workload launches would never be compiled here: the workloads must
    reach every @triton.jit kernel of kernels/ (training reaches all but the ring step)."""
    import ast

    defined = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                defined.add(node.name)
    recorded = set().union(*map(set, compiled["recorded"].values()))
    assert any(key.endswith(" train") for key in compiled["recorded"]), "no training workload recorded"
    assert defined, "no kernels found in kernels/"
    assert defined <= recorded, f"kernels no workload launches: {sorted(defined - recorded)}"


def test_compiled_kernels_fit_the_target_and_their_spill_budget(compiled):
    rows = [Resources(**r) for r in compiled["rows"]]
    expected = sum(len(k) for *_, k in _SUBSET) if not FULL else None
    if expected is not None:
        assert len(rows) == expected
    assert {r.arch for r in rows} == {90, 80}
    for r in rows:
        assert 0 < r.registers <= 255, r
        # dynamic shared memory per block: 227 KB on sm_90, 163 KB on sm_80
        assert r.shared <= (227 if r.arch == 90 else 163) * 1024, r
    assert over_budget(rows) == []


def test_the_budget_check_flags_a_spill():
    row = Resources("_dws_fwd_kernel", 90, "fp16", "eval", "BLOCK_R=32", 255, 8, 8, 8, 0)
    assert spill_budget("_dws_fwd_kernel", "fp16") == 0
    assert len(over_budget([row])) == 1 and "_dws_fwd_kernel" in over_budget([row])[0]
    allowed = spill_budget("_dilated_step_kernel", "fp32-ieee")
    assert allowed > 0
    at_budget = Resources("_dilated_step_kernel", 90, "fp32-ieee", "ring", "", 255, allowed, allowed, allowed, 0)
    assert over_budget([at_budget]) == []
