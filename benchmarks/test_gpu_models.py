"""Whole models on one GPU: training step, batch inference, per-hop streaming latency (eager and
CUDA graphs) and many streams stepped together.

Run with ``pytest benchmarks/test_gpu_models.py --benchmark-only`` on a CUDA machine; it skips
without CUDA or triton, or if TRITON_INTERPRET is set (that would time the interpreter).
``RTSED_KERNELS`` is set per case (monkeypatch); rtsed.backends.dispatch reads it at call time.

Precision: fp32 with torch's default TF32 settings, recorded in every case's extra_info:
``torch.backends.cudnn.allow_tf32 = True`` (cuDNN convolutions and the cuDNN GRU may use TF32; the
Triton kernels follow the same flag and run their dots in TF32), ``torch.backends.cuda.matmul.allow_tf32
= False`` (the classifier's Linear and Adam run in fp32), ``cudnn.benchmark = False``. The parity
checks below run with TF32 off (the parity rule of docs/streaming.md).

Figures (the ``record`` names; the session summary tabulates them in its GPU section):

- ``gpu_train_step``: one optimisation step at the paper's batch, x (16, 1024, 40) random normal,
  random 0/1 targets (16, 1024, 16): ``optimizer.zero_grad(set_to_none=True)``, forward in train
  mode, BCE-with-logits, backward, ``Adam.step`` (lr 1e-3, torch's default implementation: foreach on
  CUDA). Variants (``VARIANTS``): base (f_cnn blocks + cuDNN GRU; it has no Triton op, so
  RTSED_KERNELS=ref), dnd_7_10 with RTSED_KERNELS=ref (cuDNN, NCHW), the same model converted with
  ``model.to(memory_format=torch.channels_last)`` (whether block 1's output really comes out
  channels_last is recorded: ``block1_out_channels_last``), and dnd_7_10 with RTSED_KERNELS=triton
  (fused DWS blocks and f_dil, Triton backward). The triton case runs last and records
  ``speedup_vs_<variant>`` = that variant's median / its own; issue #5's target is base / dnd_7_10
  triton >= 4.5 (the paper: 4.45x on a V100). Peak GPU memory over the case: ``peak_memory_gb``.
- ``gpu_infer``: eval mode, ``torch.inference_mode``, the same batch and variants -> frames/s. The
  triton case first checks the whole model against ref at this batch (TF32 off): relative L2 error
  of the logits < 1e-3 asserted, the parity-rule fraction |a - b| / (1e-5 + 1e-4 |b|) recorded.
- ``gpu_stream``: per-hop latency of one stream (batch 1) of dnd_7_10 ("same", 36 frames of
  lookahead) and dnd_7_10_causal, 1 or 16 new frames per step, RTSED_KERNELS=triton or ref, each
  three ways: ``eager_push`` (``ModelStream.push``: the step plus the selection of the valid rows,
  a boolean index that synchronises), ``eager_step`` (``ModelStream.step``) and ``cuda_graph``
  (``_GraphedStep``: replay of the captured step, including the copy of the new frames into its
  static input buffer; its docstring says exactly what the graph covers). The stream is filled
  past its lookahead first (steady state: no start-of-stream masking) and the frames of each round
  are made on the GPU in the untimed setup, so host-to-device copies are not timed. The
  cuda_graph case first checks that replays equal eager steps (parity rule, TF32 off) over two
  full cycles of the ring.
- ``gpu_streams_per_gpu``: N in ``STREAM_COUNTS`` dnd_7_10 streams stepped together in one batched
  ``ModelStream.step`` of 16 new frames each (eager: launch overhead is negligible at this size),
  RTSED_KERNELS=ref or triton (f_dil and the classifier then run as one fused ring step,
  kernels/dilated_step_logits.py, whose memory beyond the ring is the logits: under ref, 10,000
  streams make a 13.8 GB f_dil output). Batch RTF = step time / (16 x 20 ms of audio): the N streams keep up
  with real time when RTF <= 1; real-time streams per GPU (estimate) = N / RTF (issue #4 target:
  10,000 on an H100). A case that does not fit in GPU memory is skipped with a message.

Every round ends with ``torch.cuda.synchronize()``; inputs are made fresh in each round's untimed
setup; medians over timed rounds after untimed warm-up rounds (``_report.measure``).
"""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch
import torch.nn.functional as F

from benchmarks._gpu import TF32
from benchmarks._report import (BASE, DND, GPU_INFER, GPU_STREAM, GPU_STREAMS, GPU_TRAIN, HOP_S, RESULTS,
                                gpu_model_key, measure, record)

if not torch.cuda.is_available():
    pytest.skip("the whole-model GPU benchmarks need a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no"):
    pytest.skip("TRITON_INTERPRET is set: this would time the interpreter", allow_module_level=True)

from rtsed.models.layers import FrameRing  # noqa: E402
from rtsed.models.model import SEDModel, build_model  # noqa: E402
from rtsed.stream.model_stream import ModelStream  # noqa: E402

BATCH, FRAMES = 16, 1024
# (model, RTSED_KERNELS, channels_last); dnd_7_10 triton last: its ratios read the others.
VARIANTS = [(BASE, "ref", False), (DND, "ref", False), (DND, "ref", True), (DND, "triton", False)]
VARIANT_IDS = [gpu_model_key(*v).replace(" ", "-") for v in VARIANTS]

STREAM_MODELS = [DND, f"{DND}_causal"]
STREAM_MODES = ["eager_push", "eager_step", "cuda_graph"]  # cuda_graph last: its ratio reads eager_step
STREAM_CASES = [(name, kernels, n, mode) for name in STREAM_MODELS for kernels in ("triton", "ref")
                for n in (1, 16) for mode in STREAM_MODES]

STREAM_COUNTS = [256, 1024, 4096, 10_000]
MANY_FRAMES = 16
MANY_CASES = [(n_streams, kernels) for n_streams in STREAM_COUNTS for kernels in ("ref", "triton")]

PARITY_ATOL, PARITY_RTOL = 1e-5, 1e-4  # the parity rule of docs/streaming.md on logits, fp32 with TF32 off


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """Each case builds its own model, optimizer, streams and graphs: give their memory back to
    the device before the next case, so that peak-memory figures and big cases start clean."""
    yield
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()




def _settings() -> dict:
    """What every case records: the device and the precision flags it ran under."""
    return dict(device=torch.cuda.get_device_name(), torch_version=torch.__version__,
                cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32),
                matmul_allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32),
                cudnn_benchmark=bool(torch.backends.cudnn.benchmark))


def _model(name: str, channels_last: bool, train: bool) -> SEDModel:
    model = build_model(name).to("cuda")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # 4-d conv weights; activations follow
    return model.train(train)


def _block1_channels_last(model: SEDModel) -> bool:
    """Whether block 1's output comes out in channels_last (a small eval forward; mode restored)."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        h = model.blocks[0](torch.randn(2, 1, 64, model.config.n_mels, device="cuda"))
    model.train(was_training)
    return h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9


def _parity(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, worst |a - b| / (atol + rtol |b|)) of two logit tensors."""
    got, want = got.double(), want.double()
    rel = float((got - want).norm() / want.norm().clamp_min(1e-30))
    frac = float(((got - want).abs() / (PARITY_ATOL + PARITY_RTOL * want.abs())).max())
    return rel, frac


def _speedups(benchmark, res, figure: str, others: list[tuple[str, str]]) -> None:
    """extra_info["speedup_vs_<suffix>"] = other case's median / this case's, for (model key, suffix)."""
    if not res.median_s:
        return
    for key, suffix in others:
        found = [r for r in RESULTS if r.figure == figure and r.model == key and r.median_s]
        if found:
            benchmark.extra_info[f"speedup_vs_{suffix}"] = found[-1].median_s / res.median_s
    res.extra = dict(benchmark.extra_info)


def _variant_speedups(benchmark, res, figure: str) -> None:
    _speedups(benchmark, res, figure,
              [(gpu_model_key(*v), gpu_model_key(*v).replace(" ", "_")) for v in VARIANTS[:-1]])


# ----------------------------------------------------------------------------------------------
# Training step and inference at the paper's batch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kernels, channels_last", VARIANTS, ids=VARIANT_IDS)
def test_gpu_train_step(benchmark, monkeypatch, name, kernels, channels_last):
    benchmark.group = f"GPU training step (zero_grad, fwd, BCE, bwd, Adam), batch {BATCH} x {FRAMES} frames, fp32"
    monkeypatch.setenv("RTSED_KERNELS", kernels)
    model = _model(name, channels_last, train=True)
    block1_cl = _block1_channels_last(model) if channels_last else False
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    n_mels, n_classes = model.config.n_mels, model.config.n_classes

    def setup():
        x = torch.randn(BATCH, FRAMES, n_mels, device="cuda")
        y = torch.randint(0, 2, (BATCH, FRAMES, n_classes), device="cuda").float()
        torch.cuda.synchronize()
        return (x, y), {}

    def train_step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        return loss

    torch.cuda.reset_peak_memory_stats()
    measure(benchmark, train_step, setup, budget_s=5, min_rounds=5, max_rounds=50, warmup_rounds=3)
    peak = _peak_gb()
    args, _ = setup()
    loss = float(train_step(*args).detach())  # one more step, to check that training stays finite
    assert math.isfinite(loss), f"{name} ({kernels}) training step gave a non-finite loss {loss}"
    res = record(benchmark, GPU_TRAIN, gpu_model_key(name, kernels, channels_last), model_name=name,
                 kernels=kernels, channels_last=channels_last, block1_out_channels_last=block1_cl,
                 batch=BATCH, frames=FRAMES, n_mels=n_mels, optimizer="Adam(lr=1e-3), torch default (foreach)",
                 peak_memory_gb=peak, **_settings(),
                 derive=lambda t: {"ms_per_step": 1e3 * t, "frames_per_second": BATCH * FRAMES / t,
                                   "audio_seconds_per_second": BATCH * FRAMES * HOP_S / t})
    if (name, kernels, channels_last) == VARIANTS[-1]:
        _variant_speedups(benchmark, res, GPU_TRAIN)


@pytest.mark.parametrize("name, kernels, channels_last", VARIANTS, ids=VARIANT_IDS)
def test_gpu_inference(benchmark, monkeypatch, name, kernels, channels_last):
    benchmark.group = f"GPU inference (eval, inference_mode), batch {BATCH} x {FRAMES} frames, fp32"
    monkeypatch.setenv("RTSED_KERNELS", kernels)
    model = _model(name, channels_last, train=False)
    block1_cl = _block1_channels_last(model) if channels_last else False
    n_mels = model.config.n_mels
    parity = {}
    if kernels == "triton":  # whole-model parity with the cuDNN reference at this batch, TF32 off
        x = torch.randn(BATCH, FRAMES, n_mels, device="cuda")
        with TF32(False), torch.inference_mode():
            got = model(x)
            monkeypatch.setenv("RTSED_KERNELS", "ref")
            want = model(x)
            monkeypatch.setenv("RTSED_KERNELS", kernels)
        rel, frac = _parity(got, want)
        del x, got, want
        parity = dict(parity_rel_l2=rel, parity_worst_fraction_of_tolerance=frac)
        assert rel < 1e-3, f"{name} triton logits differ from ref: relative L2 error {rel:.3g}"

    def setup():
        x = torch.randn(BATCH, FRAMES, n_mels, device="cuda")
        torch.cuda.synchronize()
        return (x,), {}

    def infer(x):
        with torch.inference_mode():
            out = model(x)
        torch.cuda.synchronize()
        return out

    torch.cuda.reset_peak_memory_stats()
    measure(benchmark, infer, setup, budget_s=3, min_rounds=10, max_rounds=200, warmup_rounds=3)
    res = record(benchmark, GPU_INFER, gpu_model_key(name, kernels, channels_last), model_name=name,
                 kernels=kernels, channels_last=channels_last, block1_out_channels_last=block1_cl,
                 batch=BATCH, frames=FRAMES, n_mels=n_mels, peak_memory_gb=_peak_gb(), **parity, **_settings(),
                 derive=lambda t: {"ms_per_batch": 1e3 * t, "frames_per_second": BATCH * FRAMES / t,
                                   "real_time_factor": t / (BATCH * FRAMES * HOP_S)})
    if (name, kernels, channels_last) == VARIANTS[-1]:
        _variant_speedups(benchmark, res, GPU_INFER)


# ----------------------------------------------------------------------------------------------
# Streaming: one stream per hop (eager and CUDA graphs), and many streams per GPU
# ----------------------------------------------------------------------------------------------


def _ring_step_frames(model: SEDModel, n: int) -> int:
    """``max_step_frames`` for n-frame steps: the smallest m >= n that makes f_dil's ring
    (context + m frames) a whole number of n-frame steps, so that its write position cycles
    through capacity / n phases (61 for n = 1, 5 for n = 16 with f_dil 7|10's 60 frames of context)."""
    context = model.temporal.context_frames
    m = n
    while (context + m) % n:
        m += 1
    return m


def _fill(stream: ModelStream, frames: int) -> None:
    """Step the stream past its lookahead in steps of ``frames`` (start-of-stream masking done)."""
    for _ in range(stream.lookahead_frames // frames + 2):
        stream.step(torch.randn(stream.batch_size, frames, stream.n_mels, device=stream.device))
    torch.cuda.synchronize()


class _GraphedStep:
    """``ModelStream.step`` of n frames as CUDA graphs (torch.cuda.CUDAGraph), replayed in its place.

    What a graph covers: all the GPU work of one ``ModelStream.step`` in the steady state (every
    stream past its lookahead, none ended, so no masking multiplies): the input buffer's view as
    (B, 1, n, F); per CNN block the concatenation with its ConvHistory, the in-place update of that
    history and the block itself (the fused Triton kernel or the cuDNN composition, whichever
    RTSED_KERNELS named at capture time); f_dil's ring write (slice copies into FrameRing.frames,
    in place) and its step (Triton kernel or stock torch); the classifier. The new frames come in
    through the static buffer ``x`` (copied into it before each replay); the logits land in one
    static output tensor per graph, valid until the next replay of any of the graphs (they share
    one memory pool, so a later replay may write its intermediates there).

    What it does not cover: ModelStream's CPU bookkeeping (``positions``, ``ends``, the masking
    decision, ``frame_index`` and ``valid``) runs once at capture, not on replay, so ``positions``
    goes stale (harmless here: it only decides masking, which the steady state does not need), and
    ``push``'s selection of the valid rows (all rows are valid in the steady state).

    Why several graphs: f_dil's ring write position is a Python int that the step passes by value
    to its slice copies and kernel, so a graph replays the ring phase it was captured at. With the
    ring a multiple of n frames long (``_ring_step_frames``), the write position cycles through
    P = capacity / n phases: one graph is captured per phase, all in one memory pool (safe: they are
    replayed strictly in capture order, never concurrently). Warm-up (on a side stream, as CUDA graph
    capture requires: Triton compilation, cuDNN handles and workspaces) and capture each advance
    the Python write position by a multiple of P n, i.e. not at all modulo the ring, so replay i
    starts exactly where eager step i would. Eager steps and replays may be mixed only after a
    whole number of cycles (P replays).
    """

    def __init__(self, stream: ModelStream, n: int):
        ring = stream.temporal_state
        capacity = ring.frames.shape[1] if isinstance(ring, FrameRing) else n
        if capacity % n:
            raise ValueError(f"ring of {capacity} frames is not a whole number of {n}-frame steps")
        self.phases = capacity // n
        self.x = torch.randn(stream.batch_size, n, stream.n_mels, device=stream.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.phases * math.ceil(3 / self.phases)):
                stream.step(self.x)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.logits: list[torch.Tensor] = []
        for _ in range(self.phases):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = stream.step(self.x)
            self.graphs.append(graph)
            self.logits.append(out.logits)
        torch.cuda.synchronize()
        self.next = 0

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, n, F) new frames on the GPU -> logits (B, n, C): a static tensor of this phase,
        valid until the next replay (read or copy it before stepping again)."""
        self.x.copy_(x)
        i = self.next
        self.graphs[i].replay()
        self.next = (i + 1) % self.phases
        return self.logits[i]


def _copy_state(src: ModelStream, dst: ModelStream) -> None:
    for a, b in zip(src.block_states, dst.block_states):
        b.frames.copy_(a.frames)
    dst.temporal_state.frames.copy_(src.temporal_state.frames)  # type: ignore[union-attr]
    assert dst.temporal_state.write_pos == src.temporal_state.write_pos  # type: ignore[union-attr]


def _check_graph(model: SEDModel, n: int, max_step: int) -> tuple[int, float]:
    """Replays of _GraphedStep == eager ModelStream.step on the same frames (parity rule, TF32 off)
    over two full cycles of ring phases. Returns (phases, worst fraction of the tolerance)."""
    with TF32(False):
        eager = ModelStream(model, batch_size=1, max_step_frames=max_step)
        graphed = ModelStream(model, batch_size=1, max_step_frames=max_step)
        for _ in range(eager.lookahead_frames // 64 + 2):
            warm = torch.randn(1, 64, eager.n_mels, device="cuda")
            eager.step(warm)
            graphed.step(warm)
        graph = _GraphedStep(graphed, n)  # its warm-up moved graphed's tensors: copy eager's back
        _copy_state(eager, graphed)
        worst = 0.0
        for _ in range(2 * graph.phases + 1):
            x = torch.randn(1, n, eager.n_mels, device="cuda")
            want = eager.step(x).logits
            got = graph.step(x)
            worst = max(worst, _parity(got, want)[1])
        torch.cuda.synchronize()
    assert worst <= 1.0, f"CUDA graph replay differs from eager steps: {worst:.3g} x the parity tolerance"
    return graph.phases, worst


@pytest.mark.parametrize("name, kernels, n, mode", STREAM_CASES,
                         ids=[f"{name}-{k}-n{n}-{m}" for name, k, n, m in STREAM_CASES])
def test_gpu_stream_latency(benchmark, monkeypatch, name, kernels, n, mode):
    benchmark.group = f"GPU streaming, 1 stream, {n} frame(s) per step, {name}"
    monkeypatch.setenv("RTSED_KERNELS", kernels)
    model = build_model(name).to("cuda").eval()
    n_mels = model.config.n_mels
    max_step = _ring_step_frames(model, n)
    extra: dict = {}
    if mode == "cuda_graph":
        phases, worst = _check_graph(model, n, max_step)
        extra.update(graphs=phases, parity_worst_fraction_of_tolerance=worst)
    stream = ModelStream(model, batch_size=1, max_step_frames=max_step)
    _fill(stream, 64)

    if mode == "eager_push":
        def setup():
            x = torch.randn(n, n_mels, device="cuda")
            torch.cuda.synchronize()
            return (x,), {}

        def target(x):
            out = stream.push(x)
            torch.cuda.synchronize()
            return out

        assert stream.push(torch.randn(n, n_mels, device="cuda")).shape[0] == n  # steady state
    else:
        step = stream.step if mode == "eager_step" else _GraphedStep(stream, n).step

        def setup():
            x = torch.randn(1, n, n_mels, device="cuda")
            torch.cuda.synchronize()
            return (x,), {}

        def target(x):
            out = step(x)
            torch.cuda.synchronize()
            return out

    measure(benchmark, target, setup, budget_s=2, min_rounds=50, max_rounds=5000, warmup_rounds=20)
    res = record(benchmark, GPU_STREAM, f"{gpu_model_key(name, kernels)} n{n} {mode}", model_name=name,
                 kernels=kernels, mode=mode, frames_per_step=n, max_step_frames=max_step,
                 lookahead_frames=stream.lookahead_frames, hop_s=HOP_S, **extra, **_settings(),
                 derive=lambda t: {"us_per_step": 1e6 * t, "us_per_frame": 1e6 * t / n,
                                   "real_time_factor": t / (n * HOP_S)})
    if mode == "cuda_graph":
        _speedups(benchmark, res, GPU_STREAM, [(f"{gpu_model_key(name, kernels)} n{n} eager_step", "eager_step")])


@pytest.mark.parametrize("n_streams, kernels", MANY_CASES, ids=[f"x{s}-{k}" for s, k in MANY_CASES])
def test_gpu_many_streams(benchmark, monkeypatch, n_streams, kernels):
    benchmark.group = f"GPU many streams, {DND}, {MANY_FRAMES} frames per step"
    monkeypatch.setenv("RTSED_KERNELS", kernels)
    model = build_model(DND).to("cuda").eval()
    n_mels = model.config.n_mels
    torch.cuda.reset_peak_memory_stats()
    stream = None
    try:
        stream = ModelStream(model, batch_size=n_streams, max_step_frames=MANY_FRAMES)
        _fill(stream, MANY_FRAMES)
    except torch.cuda.OutOfMemoryError:
        stream = None  # skip outside the handler, so that its traceback no longer holds GPU tensors
    if stream is None:
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"{n_streams} streams x {MANY_FRAMES} frames do not fit in GPU memory (RTSED_KERNELS={kernels})")

    def setup():
        x = torch.randn(n_streams, MANY_FRAMES, n_mels, device="cuda")
        torch.cuda.synchronize()
        return (x,), {}

    def target(x):
        out = stream.step(x)
        torch.cuda.synchronize()
        return out

    measure(benchmark, target, setup, budget_s=4, min_rounds=5, max_rounds=200, warmup_rounds=3)
    audio_s = MANY_FRAMES * HOP_S
    res = record(benchmark, GPU_STREAMS, f"{gpu_model_key(DND, kernels)} x{n_streams}", model_name=DND,
                 kernels=kernels, streams=n_streams, frames_per_step=MANY_FRAMES,
                 lookahead_frames=stream.lookahead_frames, peak_memory_gb=_peak_gb(), **_settings(),
                 derive=lambda t: {"ms_per_step": 1e3 * t, "real_time_factor": t / audio_s,
                                   "keeps_up": t <= audio_s, "real_time_streams_estimate": n_streams * audio_s / t,
                                   "frames_per_second": n_streams * MANY_FRAMES / t})
    if kernels == "triton":
        _speedups(benchmark, res, GPU_STREAMS, [(f"{gpu_model_key(DND, 'ref')} x{n_streams}", "ref")])
