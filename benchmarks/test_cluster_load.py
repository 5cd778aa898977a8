"""rtsed through NATS under load, as a pytest-benchmark case: ``benchmarks.cluster_load --quick``
(the in-process server, then a nats-server with a gateway and 1, then 2, worker processes; two
real-time WebSocket streams each), and the consistency of the JSON it writes. The capacity
search is the module's command line (minutes).

    pytest benchmarks/test_cluster_load.py --benchmark-only

No timing threshold is asserted: the figures depend on the machine. What is checked is that every
deployment detected what it was sent, and that the record's fields agree with each other.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("nats", reason="the NATS deployments need the cluster extra: pip install -e '.[cluster]'")
pytest.importorskip("websockets", reason="the load clients need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("onnxruntime", reason="the benchmark's default backend needs onnxruntime: pip install -e '.[cpu]'")

from benchmarks import cluster_load, serve_load  # noqa: E402


def check_consistent(result: dict) -> None:
    """The fields of a cluster_load result agree with each other (no figure is judged)."""
    assert [r["workers"] for r in result["runs"]] == [0, 1, 2]
    for run in result["runs"]:
        roles = {"server"} if run["workers"] == 0 else {"gateway", "nats-server",
                                                        *(f"worker{k}" for k in range(run["workers"]))}
        for t in run["trials"]:
            n = t["streams"]
            # Everything sent was detected, as rtsed.detect detects it, through every deployment.
            assert t["event_check"]["equal"], (run["deployment"], t["event_check"]["mismatched_streams"][:1])
            assert t["ended"] == n and not t["errors"]
            assert t["events"] == t["event_check"]["expected_events"] > 0
            assert t["event_latency"]["count"] == t["events"]
            for lat in (t["onset_latency"], t["event_latency"]):
                assert lat["count"] > 0 and 0 < lat["median_s"] <= lat["p95_s"] <= lat["p99_s"]
            assert set(t["cpu_cores_by_process"]) == roles == set(t["rss_mb_by_process"]["idle"])
            assert math.isclose(t["cpu_cores"], sum(t["cpu_cores_by_process"].values()), abs_tol=1e-3)
            assert math.isclose(t["cpu_cores_per_stream"], t["cpu_cores"] / n, abs_tol=1e-4)
            assert math.isclose(t["idle_rss_mb"], sum(t["rss_mb_by_process"]["idle"].values()), abs_tol=0.2)
            lat = t["step_latency"]
            rule = (t["dropped_audio_s"] == 0 and t["queue_dropped_audio_s"] == 0 and lat["p99_bound_s"] is not None
                    and lat["p99_bound_s"] <= serve_load.STEP_LATENCY_LIMIT_S and t["max_backlog_s"] <= 1.0
                    and t["ended"] == n and not t["client_limited"])
            assert t["sustained"] == rule
            if run["workers"]:
                # The gateway publishes every stream's samples (16-bit) and the workers read them back.
                per_s = t["counters_per_s"]
                assert per_s["nats_in_bytes"] > 0 and per_s["nats_out_bytes"] > 0
            else:
                assert t["counters_per_s"] == {}
        best = cluster_load.reference_trial(run)
        assert best["streams"] == max(t["streams"] for t in run["trials"])
        assert run["max_streams_sustained"] in (None, *(t["streams"] for t in run["trials"] if t["sustained"]))
    assert [r["deployment"] for r in result["overhead"]] == [cluster_load.name_of(1), cluster_load.name_of(2)]
    markdown = cluster_load.report(result)
    for run in result["runs"]:
        assert f"| {run['deployment']} |" in markdown


def test_cluster_load_quick(benchmark, tmp_path):
    path = tmp_path / "cluster_load.json"
    benchmark.pedantic(cluster_load.main, args=(["--quick", "--json", str(path)],), rounds=1, iterations=1)
    result = json.loads(path.read_text())
    for run in result["runs"]:
        t = run["trials"][0]
        benchmark.extra_info[run["deployment"]] = {k: t[k] for k in ("sustained", "onset_latency", "cpu_cores_per_stream",
                                                                       "counters_per_s")}
    check_consistent(result)
