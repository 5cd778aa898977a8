"""int8 against fp32 streaming speed in one run, timed in thread CPU time (for a loaded machine).

    python -m benchmarks.int8_speed --model dnd_7_10 --int8 rtsed/models/dnd_7_10_int8.onnx

Exports the checkpoint's fp32 step graph and steps it and the int8 graph, one intra-op thread,
through ``OnnxStream.step`` in steady state: one stream at 1, 4 and 16 frames per step, and 64
and 256 streams batched at 16 frames. Each step is timed with ``time.thread_time`` (onnxruntime
runs a one-thread session on the calling thread), the median over the rounds: on a machine where
other jobs hold the cores, wall-clock time measures the queue for the CPU, while the thread's
own CPU time still measures the work (inflated a little by the caches the other jobs evict).
``pytest benchmarks/test_backends.py --benchmark-only`` is the wall-clock suite for a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rtsed.models.bundled import resolve_model
from rtsed.models.checkpoint import load_checkpoint
from rtsed.stream.onnx_export import export_onnx
from rtsed.stream.onnx_runtime import OnnxStream

HOP_S = 0.02
CASES = ((1, 1, 400), (1, 4, 200), (1, 16, 100), (64, 16, 12), (256, 16, 5))  # streams, frames per step, rounds


def cpu_seconds_per_step(path: Path, streams: int, frames: int, rounds: int, seed: int = 0) -> float:
    """Median thread CPU seconds of one steady step of ``streams`` x ``frames`` frames."""
    stream = OnnxStream(path, batch_size=streams, threads=1)
    rng = np.random.default_rng(seed)
    n_mels = stream.config.model.n_mels
    for _ in range(4):  # past the lookahead: the steady session
        stream.step(rng.standard_normal((streams, 16, n_mels)).astype(np.float32) - 5)
    times = []
    for _ in range(rounds):
        x = rng.standard_normal((streams, frames, n_mels)).astype(np.float32) - 5
        start = time.thread_time()
        stream.step(x)
        times.append(time.thread_time() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint or bundled detector name (its fp32 graph is exported)")
    p.add_argument("--int8", required=True, help="its int8 step graph")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(resolve_model(args.model), "cpu")
    print("| case | fp32 us/frame | int8 us/frame | fp32 streams/core | int8 streams/core | int8 / fp32 |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="rtsed-int8-speed-") as tmp:
        fp32 = export_onnx(ckpt.model, ckpt.config, Path(tmp) / "fp32.onnx", streaming=True)
        for streams, frames, rounds in CASES:
            t32 = cpu_seconds_per_step(fp32, streams, frames, rounds)
            t8 = cpu_seconds_per_step(Path(args.int8), streams, frames, rounds)
            per = streams * frames
            print(f"| {streams} stream(s), {frames} frame(s) per step | {1e6 * t32 / per:.0f} | {1e6 * t8 / per:.0f} | "
                  f"{HOP_S * per / t32:.0f} | {HOP_S * per / t8:.0f} | {t32 / t8:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
