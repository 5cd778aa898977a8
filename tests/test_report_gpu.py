"""The benchmark summary's GPU section (benchmarks/_report.py), on synthetic results: no GPU needed.

Each test fills ``_report.RESULTS`` with Result records shaped like those that
benchmarks/test_gpu_models.py, test_kernels_dws.py and test_kernels_dilated.py record, renders the
Markdown and checks the rows and the ratios (recomputed here from the medians given).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_report():
    """benchmarks/_report.py under a private name (tests/ does not put the repository on sys.path)."""
    name = "_rtsed_bench_report_under_test"
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


R = _load_report()
HEADER = dict(cpu="Test CPU", avx512=True, usable_cpus=2, logical_cpus=2, torch="2.x", python="3.x",
              kernels_backend="auto", allocator="glibc malloc", torch_threads_default=2, load_avg_1min=0.5)
DEVICE = "NVIDIA H100 80GB HBM3"
FLAGS = dict(device=DEVICE, cudnn_allow_tf32=True, matmul_allow_tf32=False, cudnn_benchmark=False)


@pytest.fixture(autouse=True)
def _clean_results():
    saved = list(R.RESULTS)
    R.RESULTS.clear()
    yield
    R.RESULTS[:] = saved


def _add(figure: str, model: str, median_s: float | None, **extra) -> None:
    R.RESULTS.append(R.Result(figure, model, f"test[{model}]", median_s, median_s, median_s, 0.0,
                              0 if median_s is None else 5, dict(extra)))


def _render() -> str:
    return R.render_markdown(HEADER, None, None)


def _row(text: str, *first_cells: str) -> list[str]:
    """The cells of the one table row whose first cells are ``first_cells``."""
    prefix = "| " + " | ".join(first_cells) + " |"
    rows = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, f"expected one row starting {prefix!r}, found {rows}"
    return [c.strip() for c in rows[0].strip("|").split("|")]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}"


def _ms(v: float) -> str:
    return f"{v * 1e3:.3g} ms"


def _fill_whole_models(times: dict[str, float], figure: str) -> None:
    for key, t in times.items():
        _add(figure, key, t, batch=16, frames=1024, n_mels=40, frames_per_second=16 * 1024 / t,
             peak_memory_gb=10.0 if "triton" in key else 20.0, **FLAGS)


def test_whole_model_table_rows_and_ratios():
    base, ref, ref_cl, tri = (R.gpu_model_key("base", "ref"), R.gpu_model_key("dnd_7_10", "ref"),
                              R.gpu_model_key("dnd_7_10", "ref", True), R.gpu_model_key("dnd_7_10", "triton"))
    train = {base: 0.463, ref: 0.217, ref_cl: 0.181, tri: 0.0917}
    infer = {base: 0.0412, ref: 0.0301, ref_cl: 0.0277, tri: 0.0123}
    _fill_whole_models(train, R.GPU_TRAIN)
    _fill_whole_models(infer, R.GPU_INFER)
    text = _render()

    assert "\n## GPU\n" in text
    assert f"- GPU: {DEVICE}" in text
    assert "cudnn.allow_tf32=True" in text and "cuda.matmul.allow_tf32=False" in text
    assert "batch 16 x 1024 frames x 40 mels" in text

    cells = _row(text, "training step (zero_grad, forward, BCE, backward, Adam), time per batch")
    assert cells[1:5] == [_ms(t) for t in train.values()]
    assert cells[5:] == [_ratio(train[base], train[tri]), _ratio(train[ref], train[tri]),
                         _ratio(train[ref_cl], train[tri])]
    fps = _row(text, "training step, frames/s")
    assert fps[4] == f"{round(16 * 1024 / train[tri]):,}"
    # frames/s ratios are triton's over the other's: the same speed-ups as the times give
    assert [float(c) for c in fps[5:]] == pytest.approx([float(c) for c in cells[5:]], abs=0.011)
    mem = _row(text, "training step, peak GPU memory")
    assert mem[1:5] == ["20.00 GB", "20.00 GB", "20.00 GB", "10.00 GB"] and mem[5:] == ["2.00"] * 3

    cells = _row(text, "inference (eval, inference_mode), time per batch")
    assert cells[1:5] == [_ms(t) for t in infer.values()]
    assert cells[5:] == [_ratio(infer[base], infer[tri]), _ratio(infer[ref], infer[tri]),
                         _ratio(infer[ref_cl], infer[tri])]

    measured = _ratio(train[base], train[tri])  # 5.05 >= 4.5
    assert f"measured {measured}, met." in text


def test_training_target_not_met_and_missing_variants():
    base, tri = R.gpu_model_key("base", "ref"), R.gpu_model_key("dnd_7_10", "triton")
    _fill_whole_models({base: 0.30, tri: 0.08}, R.GPU_TRAIN)  # ref variants not run
    text = _render()
    cells = _row(text, "training step (zero_grad, forward, BCE, backward, Adam), time per batch")
    assert cells[1:] == [_ms(0.30), "-", "-", _ms(0.08), _ratio(0.30, 0.08), "-", "-"]
    assert f"measured {_ratio(0.30, 0.08)}, NOT met." in text
    assert "inference (eval" not in text  # no inference results: no inference rows


def test_stream_latency_table():
    step_s, graph_s, push_s = 412e-6, 87e-6, 455e-6
    for mode, t in (("eager_push", push_s), ("eager_step", step_s), ("cuda_graph", graph_s)):
        _add(R.GPU_STREAM, f"dnd_7_10 triton n1 {mode}", t, model_name="dnd_7_10", kernels="triton",
             mode=mode, frames_per_step=1, **FLAGS)
    _add(R.GPU_STREAM, "dnd_7_10_causal ref n16 eager_step", 2e-3, model_name="dnd_7_10_causal", kernels="ref",
         mode="eager_step", frames_per_step=16, **FLAGS)
    text = _render()
    cells = _row(text, "dnd_7_10", "triton", "1")
    assert cells[3:6] == ["455 us", "412 us", "87 us"]
    assert cells[6] == _ratio(step_s, graph_s)
    assert cells[7] == f"{step_s / 0.02:.3g}" and cells[8] == f"{graph_s / 0.02:.3g}"
    cells = _row(text, "dnd_7_10_causal", "ref", "16")
    assert cells[3:] == ["-", "2 ms", "-", "-", f"{2e-3 / (16 * 0.02):.3g}", "-"]


def test_many_streams_table():
    for n_streams, kernels, t in ((4096, "ref", 0.150), (4096, "triton", 0.060), (10_000, "ref", 0.400),
                                  (10_000, "triton", 0.140)):
        _add(R.GPU_STREAMS, f"dnd_7_10 {kernels} x{n_streams}", t, model_name="dnd_7_10", kernels=kernels,
             streams=n_streams, frames_per_step=16, peak_memory_gb=12.5, **FLAGS)
    text = _render()
    cells = _row(text, "dnd_7_10", "triton", "10,000")
    rtf = 0.140 / (16 * 0.02)
    assert cells[3:] == ["16", _ms(0.140), f"{rtf:.3g}", "yes", f"{round(10_000 / rtf):,}", "12.50 GB",
                         _ratio(0.400, 0.140)]
    cells = _row(text, "dnd_7_10", "ref", "10,000")
    assert cells[5:7] == [f"{0.400 / 0.32:.3g}", "no"] and cells[-1] == "-"
    assert "Largest N measured that keeps up: ref: 4,096, triton: 10,000." in text


def test_kernel_tables():
    dws = {"cudnn_nchw": 3.1e-3, "cudnn_channels_last": 2.6e-3, "triton": 1.4e-3}
    for impl, t in dws.items():
        _add(R.KERNEL_DWS, f"block1/fwd_bwd/fp32/{impl}", t, impl=impl, block="block1", mode="fwd_bwd",
             dtype="fp32", device=DEVICE, effective_gb_per_s=812.0, model_tflop_per_s=21.5)
    dil = {"cudnn_nchw": 9.0e-3, "cudnn_channels_last": 7.5e-3, "triton": 4.0e-3}
    for impl, t in dil.items():
        _add(R.DIL_INFER, f"{impl} tf32", t, impl=impl, precision="tf32", device=DEVICE,
             gb_per_s_effective=1500.0, tflops_useful=12.25)
    _add(R.DIL_TRAIN, "triton fp16", 5e-3, impl="triton", precision="fp16", device=DEVICE)
    for impl, t in (("torch", 95e-6), ("triton", 19e-6)):
        _add(R.DIL_STEP, f"{impl} x16 n16", t, impl=impl, streams=16, frames_per_step=16, device=DEVICE)
    text = _render()

    cells = _row(text, "block1", "fwd_bwd", "fp32")
    assert cells[3:6] == [_ms(t) for t in dws.values()]
    assert cells[6:8] == [_ratio(dws["cudnn_nchw"], dws["triton"]), _ratio(dws["cudnn_channels_last"], dws["triton"])]
    assert cells[8:] == ["812", "21.5"]

    cells = _row(text, "inference", "tf32")
    assert cells[2:5] == [_ms(t) for t in dil.values()]
    assert cells[5:7] == [_ratio(dil["cudnn_nchw"], dil["triton"]), _ratio(dil["cudnn_channels_last"], dil["triton"])]
    assert cells[7:] == ["1.5e+03", "12.2"]
    cells = _row(text, "training (fwd + bwd)", "fp16")
    assert cells[2:] == ["-", "-", "5 ms", "-", "-", "-", "-"]  # cuDNN cases missing: no ratios

    cells = _row(text, "16", "16")
    assert cells[2:] == ["95 us", "19 us", _ratio(95e-6, 19e-6), f"{19e-6 / 256 * 1e6:.3g} us"]
    # GPU-only run: the CPU base vs dnd_7_10 table is left out
    assert "| figure | base | dnd_7_10 |" not in text


def test_fused_ring_step_table():
    """The fused ring step's rows: times, their ratio and each side's step memory; a case the
    unfused step could not fit (skipped, so no result) leaves its cells empty."""
    _add(R.DIL_STEP_LOGITS, "step_then_linear x16 n16", 40e-6, impl="step_then_linear", streams=16,
         frames_per_step=16, peak_step_memory_gb=0.022, device=DEVICE)
    _add(R.DIL_STEP_LOGITS, "fused x16 n16", 25e-6, impl="fused", streams=16, frames_per_step=16,
         peak_step_memory_gb=0.000016, device=DEVICE)
    _add(R.DIL_STEP_LOGITS, "fused x10000 n16", 9e-3, impl="fused", streams=10_000, frames_per_step=16,
         peak_step_memory_gb=0.0102, device=DEVICE)
    text = _render()
    assert _row(text, "16", "16")[2:] == ["40 us", "25 us", _ratio(40e-6, 25e-6), "0.022 GB", "1.6e-05 GB"]
    assert _row(text, "10,000", "16")[2:] == ["-", _ms(9e-3), "-", "-", "0.0102 GB"]
    assert "| figure | base | dnd_7_10 |" not in text  # a GPU figure: no CPU table


def test_cpu_only_results_render_no_gpu_section():
    _add("offline", "base", 11.3, threads=2, frames_per_second=1448.0, seconds_per_batch=11.3)
    _add("offline", "dnd_7_10", 28.1, threads=2, frames_per_second=583.0, seconds_per_batch=28.1)
    _add("stream", "dnd_7_10", 1.79e-3, frames_per_step=1, us_per_frame=1793.0, ms_per_step=1.79,
         real_time_factor=0.0896, streams_per_core=11.2)
    text = _render()
    assert "GPU" not in text
    assert "| figure | base | dnd_7_10 | ratio (base/dnd_7_10) |" in text
    cells = _row(text, "offline inference, time per batch")
    assert cells[1:] == ["11.3 s", "28.1 s", _ratio(11.3, 28.1)]
    assert text.rstrip().splitlines()[-1].startswith("| test[")  # the spread table still ends it


def test_out_of_memory_skips_the_case_and_records_why():
    """benchmarks/_gpu.skip_on_oom, which benchmarks/conftest.py wraps around every case: an OOM is a
    skip naming what did not fit (kept in OOM_SKIPS for the summary); other errors still fail."""
    spec = importlib.util.spec_from_file_location("_rtsed_bench_gpu_under_test", REPO / "benchmarks" / "_gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    import torch

    with pytest.raises(pytest.skip.Exception, match="out of GPU memory: CUDA out of memory. Tried to allocate 13.8"):
        with gpu.skip_on_oom("bench::x10000"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 13.8 GiB\nmore detail")
    assert gpu.OOM_SKIPS == [("bench::x10000", "CUDA out of memory. Tried to allocate 13.8 GiB")]
    with pytest.raises(ValueError):
        with gpu.skip_on_oom("bench::other"):
            raise ValueError("not memory")
    assert len(gpu.OOM_SKIPS) == 1
