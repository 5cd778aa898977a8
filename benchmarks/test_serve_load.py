"""``python -m rtsed.serve`` under load, as a pytest-benchmark case: one trial of
``benchmarks.serve_load`` per backend (N real-time WebSocket streams, procedural scenes; the
capacity search and the soak are the module's command line, they take minutes to hours).

    RTSED_SERVE_LOAD_STREAMS=32 RTSED_SERVE_LOAD_S=60 pytest benchmarks/test_serve_load.py --benchmark-only

The timed figure is the whole trial (server start, N streams of RTSED_SERVE_LOAD_S seconds, the
event check); what matters is in extra_info: sustained or not, dropped audio, step latency,
backlog, RSS, and whether every stream's events equal rtsed.detect's on its audio.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("websockets", reason="the load clients need the serve extra: pip install -e '.[serve]'")

from benchmarks import serve_load  # noqa: E402


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_serve_load_trial(benchmark, backend):
    if backend == "onnx":
        pytest.importorskip("onnxruntime", reason="--backend onnx needs onnxruntime: pip install -e '.[cpu]'")
    streams = int(os.environ.get("RTSED_SERVE_LOAD_STREAMS", "8"))
    seconds = float(os.environ.get("RTSED_SERVE_LOAD_S", "20"))
    args = serve_load.build_parser().parse_args(["--streams", str(streams), "--trial-s", str(seconds),
                                                 "--warmup-s", str(min(10.0, seconds / 4))])
    record = benchmark.pedantic(serve_load.trial, args=(args, backend, streams, seconds, True), rounds=1,
                                iterations=1)
    record.pop("rss_samples")
    benchmark.extra_info.update(record)
    # The load is only meaningful if the server detected what it was sent.
    assert record["event_check"]["equal"], record["event_check"]["mismatched_streams"][:2]
    assert record["ended"] == streams and not record["errors"]
