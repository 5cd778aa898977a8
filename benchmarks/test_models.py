"""The paper's baseline (base) against its proposal (dnd_7_10), side by side.

Run with ``pytest benchmarks/ --benchmark-only`` (a few minutes on 2 cores). Figures:

- model size: parameters and multiply-accumulates per output frame (deterministic counts);
- offline inference: eval mode, ``torch.inference_mode``, batch 16 x 1024 frames x 40 mel bands of
  random normal input, torch's default thread count -> frames per second;
- train step: train mode, zero_grad, forward, BCE-with-logits loss against random 0/1 targets,
  backward, Adam step (as train.fit runs it), default thread count; and dnd_7_10 through
  train.fit's own train_step in fp32 and in bf16 (``--precision bf16``);
- streaming: one stream, one thread, ``ModelStream.push`` of 1 or 16 new random frames after the
  lookahead has filled -> microseconds of compute per frame, real-time factor, streams per core,
  for base, dnd_7_10 ("same" padding, 36 frames of lookahead), dnd_7_10_causal, and dnd_7_10
  at ``--precision bf16``;
- offline inference of dnd_7_10 at ``--precision bf16`` too.

Each pytest-benchmark group holds one figure for every model, so its table shows them side by
side; the session summary (conftest.py) adds the ratios and writes benchmarks/latest.md.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks._report import BASE, DND, HOP_S, measure, record
from rtsed.models.model import build_model, count_parameters, macs_per_frame
from rtsed.stream.model_stream import ModelStream

BATCH, FRAMES = 16, 1024
PAIR = [BASE, DND]
STREAM_MODELS = [BASE, DND, f"{DND}_causal"]


def _n_mels(model) -> int:
    return model.config.n_mels


# ----------------------------------------------------------------------------------------------
# Model size
# ----------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="model size: params and MACs in extra_info (the time is the MAC-counting pass)")
@pytest.mark.parametrize("name", PAIR)
def test_model_size(benchmark, name):
    model = build_model(name)
    macs = benchmark.pedantic(macs_per_frame, args=(model,), rounds=1, iterations=1)
    params = count_parameters(model)
    record(benchmark, "params", name, params=params)
    record(benchmark, "macs", name, macs_per_frame=macs,
           gmac_per_audio_second=macs / HOP_S / 1e9)


# ----------------------------------------------------------------------------------------------
# Offline: inference and forward + backward at the paper's batch
# ----------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group=f"offline inference, batch {BATCH} x {FRAMES} frames")
@pytest.mark.parametrize("name", PAIR)
def test_offline_inference(benchmark, torch_threads, name):
    threads = torch_threads(None)  # torch's default: all cores
    model = build_model(name).eval()

    def setup():
        return (torch.randn(BATCH, FRAMES, _n_mels(model)),), {}

    def infer(x):
        with torch.inference_mode():
            return model(x)

    measure(benchmark, infer, setup, budget_s=30, min_rounds=3, max_rounds=10, warmup_rounds=1)
    record(benchmark, "offline", name, threads=threads, batch=BATCH, frames=FRAMES,
           derive=lambda t: {"seconds_per_batch": t,
                             "frames_per_second": BATCH * FRAMES / t,
                             "ms_per_frame": 1e3 * t / (BATCH * FRAMES)})


@pytest.mark.benchmark(group=f"offline inference, batch {BATCH} x {FRAMES} frames, --precision bf16")
def test_offline_inference_bf16(benchmark, torch_threads):
    """dnd_7_10 under ``--precision bf16`` (rtsed.backends.precision: the CNN's pointwise GEMMs in bf16,
    float32 accumulation, the rest float32)."""
    from rtsed.backends.precision import autocast

    threads = torch_threads(None)
    model = build_model(DND).eval()

    def setup():
        return (torch.randn(BATCH, FRAMES, _n_mels(model)),), {}

    def infer(x):
        with torch.inference_mode(), autocast("bf16"):
            return model(x)

    measure(benchmark, infer, setup, budget_s=30, min_rounds=3, max_rounds=10, warmup_rounds=1)
    record(benchmark, "offline_bf16", DND, threads=threads, batch=BATCH, frames=FRAMES, precision="bf16",
           derive=lambda t: {"seconds_per_batch": t, "frames_per_second": BATCH * FRAMES / t})


def _training(name: str):
    """(model in train mode, Adam, batch()): batch() makes a fresh random (x, y) of BATCH x FRAMES
    frames, y random 0/1 targets."""
    model = build_model(name).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def batch():
        return (torch.randn(BATCH, FRAMES, _n_mels(model)),
                torch.randint(0, 2, (BATCH, FRAMES, model.config.n_classes)).float())

    return model, optimizer, batch


@pytest.mark.benchmark(group=f"train step (forward, BCE, backward, Adam), batch {BATCH} x {FRAMES} frames")
@pytest.mark.parametrize("name", PAIR)
def test_train_step(benchmark, torch_threads, name):
    """One step as train.fit takes it: zero_grad, forward, BCE-with-logits, backward, Adam."""
    threads = torch_threads(None)
    model, optimizer, batch = _training(name)

    def setup():
        x, y = batch()
        return (x, y), {}

    def train_step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    measure(benchmark, train_step, setup, budget_s=40, min_rounds=3, max_rounds=8, warmup_rounds=1)
    record(benchmark, "train_step", name, threads=threads, batch=BATCH, frames=FRAMES, optimizer="Adam",
           derive=lambda t: {"seconds_per_batch": t,
                             "frames_per_second": BATCH * FRAMES / t,
                             "ms_per_frame": 1e3 * t / (BATCH * FRAMES)})


@pytest.mark.benchmark(group=f"train step (forward, BCE, backward, Adam), batch {BATCH} x {FRAMES} frames")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_fit(benchmark, torch_threads, precision):
    """dnd_7_10's step through train.fit's own ``train_step`` (masked BCE; ``--precision``):
    fp32, and bf16 (the fast paths' GEMMs in bfloat16 under CPU autocast, the rest float32;
    tests/test_fit.py checks that it converges like fp32)."""
    from train.fit import train_step

    threads = torch_threads(None)
    model, optimizer, batch = _training(DND)

    def setup():
        x, y = batch()
        return (x, y, torch.ones(BATCH, FRAMES)), {}

    measure(benchmark, lambda x, y, mask: train_step(model, optimizer, x, y, mask, precision), setup,
            budget_s=30, min_rounds=3, max_rounds=8, warmup_rounds=1)
    record(benchmark, f"train_step_fit_{precision}", DND, threads=threads, batch=BATCH, frames=FRAMES,
           precision=precision, derive=lambda t: {"seconds_per_batch": t, "frames_per_second": BATCH * FRAMES / t})


# ----------------------------------------------------------------------------------------------
# Streaming: one stream, one thread
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames_per_step", [1, 16])
@pytest.mark.parametrize("name", STREAM_MODELS + [f"{DND} [bf16]"])
def test_streaming(benchmark, torch_threads, name, frames_per_step):
    """"<model> [bf16]": ModelStream(precision="bf16") (its GEMMs from 4M multiply-accumulates up
    in bf16: at one frame per step none is that large, so it runs as fp32)."""
    benchmark.group = f"streaming, 1 stream, 1 thread, {frames_per_step} frame(s) per step"
    threads = torch_threads(1)
    model_name, _, tag = name.partition(" [")
    model = build_model(model_name).eval()
    n_mels = _n_mels(model)
    stream = ModelStream(model, batch_size=1, max_step_frames=64, precision="bf16" if tag else "fp32")
    # Fill the lookahead (36 frames for dnd_7_10) and the f_dil ring, so that timed steps are the
    # steady state: every new frame completes one output frame, no start-of-stream masking.
    for _ in range(3):
        stream.push(torch.randn(64, n_mels))
    assert stream.push(torch.randn(frames_per_step, n_mels)).shape[0] == frames_per_step

    def setup():
        return (torch.randn(frames_per_step, n_mels),), {}

    measure(benchmark, stream.push, setup, budget_s=3, min_rounds=30, max_rounds=3000, warmup_rounds=20)
    record(benchmark, "stream", name, threads=threads, frames_per_step=frames_per_step,
           lookahead_frames=stream.lookahead_frames, hop_s=HOP_S,
           derive=lambda t: {"ms_per_step": 1e3 * t,
                             "us_per_frame": 1e6 * t / frames_per_step,
                             "ms_per_frame": 1e3 * t / frames_per_step,
                             "real_time_factor": t / frames_per_step / HOP_S,
                             "streams_per_core": HOP_S * frames_per_step / t})
