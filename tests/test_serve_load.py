"""The arithmetic of the serve load benchmark (benchmarks/serve_load.py) without a server: every
stream sends different audio, step latency comes out of two real /metrics readings, memory per
stream is the RSS slope. The benchmark's own trials run with ``pytest benchmarks/test_serve_load.py``."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("prometheus_client", reason="the server's metrics need the serve extra: pip install -e '.[serve]'")

from benchmarks import serve_load  # noqa: E402
from rtsed.serve.telemetry import ServerMetrics  # noqa: E402


def test_every_stream_sends_different_audio_of_the_trial_length():
    scenes = [np.random.default_rng(i).standard_normal(16000 * 5).astype(np.float32) for i in range(3)]
    streams = [serve_load.stream_audio(scenes, i, 12.0, 16000) for i in range(10)]
    assert all(x.shape == (12 * 16000,) for x in streams)
    # Stream 3 plays scene 0 again, from 7.3 s further in (wrapped), and longer than the scene: tiled.
    np.testing.assert_array_equal(streams[3][:16000], np.roll(scenes[0], -int(7.3 * 16000) % 80000)[:16000])
    np.testing.assert_array_equal(streams[0][80000:96000], scenes[0][:16000])
    firsts = {x[:1600].tobytes() for x in streams}
    assert len(firsts) == 10, "two streams send the same audio"
    raw = np.frombuffer(serve_load.to_s16le(np.array([0.5, -1.0, 1.0], np.float32)), "<i2")
    assert raw.tolist() == [16384, -32768, 32767]


def test_step_latency_from_two_metrics_readings():
    from prometheus_client import generate_latest

    m = ServerMetrics()
    for _ in range(50):
        m.step_seconds.observe(0.0008)  # the warm-up: not counted
    before = serve_load.read_metrics(generate_latest(m.registry).decode())
    for _ in range(990):
        m.step_seconds.observe(0.003)
    for _ in range(10):
        m.step_seconds.observe(0.03)
    m.dropped_audio.inc(0.5)
    after = serve_load.read_metrics(generate_latest(m.registry).decode())
    lat = serve_load.step_latency(before, after)
    assert lat["steps"] == 1000 and lat["p99_bound_s"] == 0.005
    assert lat["mean_s"] == pytest.approx((990 * 0.003 + 10 * 0.03) / 1000)
    assert after["rtsed_dropped_audio_seconds_total"] == 0.5
    for _ in range(20):
        m.step_seconds.observe(0.03)
    later = serve_load.read_metrics(generate_latest(m.registry).decode())
    assert serve_load.step_latency(before, later)["p99_bound_s"] == 0.04  # 30 of 1020 steps above 20 ms


def test_memory_per_stream_is_the_rss_slope():
    trials = [{"streams": n, "idle_rss_mb": 250.0 + d, "steady_rss_mb": 250.0 + 1.5 * n + d}
              for n, d in ((8, 0.4), (16, -0.3), (32, 0.1))]
    assert serve_load.rss_slope(trials) == pytest.approx(1.5, abs=0.05)
    assert serve_load.rss_slope([{"streams": 8, "idle_rss_mb": 250.0, "steady_rss_mb": None}]) is None
