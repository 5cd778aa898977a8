"""Streaming backends side by side: onnxruntime against torch eager, and many streams per core.

- one stream, one thread, 1 / 4 / 16 frames per step: compute per frame and real-time factor for
  dnd_7_10 (same padding), dnd_7_10_causal and base, torch ``ModelStream`` vs ``OnnxStream``
  (the exported step graph; CPU execution provider, one intra-op thread);
- many streams, one thread: N independent dnd_7_10 streams stepped in one batched call of 16
  frames each -> how many real-time streams one core sustains (issue target: 250+ with
  onnxruntime), with the front end excluded (its cost is reported separately below);
- ``onnx-int8``: the same model's step graph statically quantized (``rtsed.export --quantize
  int8``: QDQ S8S8, per-channel weights), calibrated on procedurally made audio (the speed does
  not depend on which audio set the ranges), beside fp32 in every streaming figure; and offline
  frames/s of the offline graph, fp32 against int8, on two threads.

The figures land in the session summary's streaming table (model names carry the backend).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks._report import DND, HOP_S, measure, record
from rtsed.config import DetectorConfig, FrontendConfig
from rtsed.stream.onnx_export import export_onnx
from rtsed.audio.frontend import LogMelStream
from rtsed.models.model import build_model
from rtsed.stream.onnx_quantize import export_int8
from rtsed.stream.onnx_runtime import OnnxOffline, OnnxStream
from rtsed.stream.model_stream import ModelStream

MODELS = [DND, f"{DND}_causal", "base"]
INT8_MODELS = [DND, f"{DND}_causal"]  # the int8 path is measured for the DnD family
BACKENDS = ["torch", "onnx", "onnx-int8"]


def _calibration_folder(folder):
    """Three 10 s procedural scenes (noise, tones) to calibrate the int8 graphs on."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    for i in range(3):
        x = rng.standard_normal(160000).astype(np.float32) * 0.02
        for _ in range(5):
            start, length = rng.integers(0, 144000), rng.integers(3200, 16000)
            x[start:start + length] += 0.3 * np.sin(2 * np.pi * rng.uniform(200, 4000) * t[:length])
        sf.write(folder / f"scene_{i}.wav", x, 16000)
    return folder


@pytest.fixture(scope="module")
def step_graphs(tmp_path_factory):
    """name -> (model, fp32 step graph, int8 step graph or None)."""
    folder = tmp_path_factory.mktemp("onnx")
    calibration = _calibration_folder(tmp_path_factory.mktemp("calibration"))
    graphs = {}
    for name in MODELS:
        model = build_model(name).eval()
        config = DetectorConfig(model=model.config)
        int8 = (export_int8(model, config, folder / f"{name}_int8.onnx", calibration, streaming=True)
                if name in INT8_MODELS else None)
        graphs[name] = (model, export_onnx(model, config, folder / f"{name}.onnx", streaming=True), int8)
    return graphs


def _steady_torch(model, frames_per_step):
    stream = ModelStream(model, batch_size=1, max_step_frames=64)
    for _ in range(3):
        stream.push(torch.randn(64, 40))
    return lambda x: stream.push(torch.from_numpy(x))


def _steady_onnx(path, frames_per_step):
    stream = OnnxStream(path, batch_size=1, threads=1)
    for _ in range(3):
        stream.push(np.random.randn(64, 40).astype(np.float32))
    return stream.push


@pytest.mark.parametrize("frames_per_step", [1, 4, 16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_stream_backend(benchmark, torch_threads, step_graphs, name, backend, frames_per_step):
    benchmark.group = f"streaming backends, 1 stream, 1 thread, {frames_per_step} frame(s) per step"
    threads = torch_threads(1)
    model, path, int8 = step_graphs[name]
    if backend == "onnx-int8" and int8 is None:
        pytest.skip(f"no int8 graph measured for {name}")
    push = (_steady_torch(model, frames_per_step) if backend == "torch"
            else _steady_onnx(int8 if backend == "onnx-int8" else path, frames_per_step))
    assert push(np.random.randn(frames_per_step, 40).astype(np.float32)).shape[0] == frames_per_step

    def setup():
        return (np.random.randn(frames_per_step, 40).astype(np.float32),), {}

    measure(benchmark, push, setup, budget_s=3, min_rounds=30, max_rounds=3000, warmup_rounds=20)
    record(benchmark, "stream", f"{name} [{backend}]", threads=threads, frames_per_step=frames_per_step,
           backend=backend, hop_s=HOP_S,
           derive=lambda t: {"ms_per_step": 1e3 * t,
                             "us_per_frame": 1e6 * t / frames_per_step,
                             "ms_per_frame": 1e3 * t / frames_per_step,
                             "real_time_factor": t / frames_per_step / HOP_S,
                             "streams_per_core": HOP_S * frames_per_step / t})


@pytest.mark.parametrize("n_streams", [64, 256])
@pytest.mark.parametrize("backend", BACKENDS)
def test_many_streams_per_core(benchmark, torch_threads, step_graphs, backend, n_streams):
    """N dnd_7_10 streams, 16 new frames each per batched call, one thread."""
    benchmark.group = "many streams, dnd_7_10, 16 frames per step, 1 thread"
    torch_threads(1)
    frames = 16
    model, path, int8 = step_graphs[DND]
    path = int8 if backend == "onnx-int8" else path
    if backend == "torch":
        stream = ModelStream(model, batch_size=n_streams, max_step_frames=frames)

        def step(x):
            with torch.no_grad():
                return stream.step(torch.from_numpy(x))
    else:
        onnx_stream = OnnxStream(path, batch_size=n_streams, threads=1)
        step = onnx_stream.step
    for _ in range(4):  # past the 36-frame lookahead: steady state, no masking
        step(np.random.randn(n_streams, frames, 40).astype(np.float32))

    def setup():
        return (np.random.randn(n_streams, frames, 40).astype(np.float32),), {}

    measure(benchmark, step, setup, budget_s=8, min_rounds=3, max_rounds=200, warmup_rounds=2)
    record(benchmark, "stream", f"{DND} x{n_streams} [{backend}]", frames_per_step=frames, backend=backend,
           derive=lambda t: {"ms_per_step": 1e3 * t,
                             "us_per_frame": 1e6 * t / (frames * n_streams),
                             "ms_per_frame": 1e3 * t / (frames * n_streams),
                             "real_time_factor": t / (frames * n_streams) / HOP_S,
                             "streams_per_core": HOP_S * frames * n_streams / t})


@pytest.fixture(scope="module")
def offline_graphs(tmp_path_factory):
    """dnd_7_10's offline graph, fp32 and int8 (calibrated on procedural scenes)."""
    folder = tmp_path_factory.mktemp("offline")
    calibration = _calibration_folder(tmp_path_factory.mktemp("calibration"))
    model = build_model(DND).eval()
    config = DetectorConfig(model=model.config)
    return {"onnx": export_onnx(model, config, folder / "fp32.onnx"),
            "onnx-int8": export_int8(model, config, folder / "int8.onnx", calibration)}


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_offline_onnx(benchmark, offline_graphs, backend):
    """The offline graph over one minute of frames (3000), batch 1, two intra-op threads."""
    benchmark.group = "offline onnxruntime, dnd_7_10, 1 x 3000 frames, 2 threads"
    frames, threads = 3000, 2
    graph = OnnxOffline(offline_graphs[backend], threads=threads)

    def setup():
        return (np.random.randn(1, frames, 40).astype(np.float32),), {}

    measure(benchmark, graph.logits, setup, budget_s=5, min_rounds=3, max_rounds=100, warmup_rounds=2)
    record(benchmark, "offline_onnx", f"{DND} [{backend}]", threads=threads, frames=frames, backend=backend,
           derive=lambda t: {"frames_per_second": frames / t, "seconds_per_batch": t})


def test_frontend_per_stream(benchmark, torch_threads):
    """The log-mel front end of one 16 kHz stream, one hop (320 samples) per push, one thread:
    the per-stream cost the many-streams figure leaves out."""
    benchmark.group = "front end, 1 stream, 1 thread"
    torch_threads(1)
    config = FrontendConfig.for_rate(16000)
    stream = LogMelStream(config)

    def setup():
        return (np.random.randn(config.hop_samples * 16).astype(np.float32) * 0.1,), {}

    stream.push(np.zeros(config.window_samples, np.float32))
    measure(benchmark, stream.push, setup, budget_s=3, min_rounds=30, max_rounds=2000, warmup_rounds=10)
    record(benchmark, "stream", "log-mel front end (16 kHz) [torch]", frames_per_step=16,
           derive=lambda t: {"ms_per_step": 1e3 * t, "us_per_frame": 1e6 * t / 16,
                             "ms_per_frame": 1e3 * t / 16, "real_time_factor": t / 16 / HOP_S,
                             "streams_per_core": HOP_S * 16 / t})
