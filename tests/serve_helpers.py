"""A real ``python -m rtsed.serve`` process on loopback, a scene to stream through it, and a
``websockets`` client: what the server tests share."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
MODEL = "dnd_7_10.pt"  # the bundled detector: real weights, real events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m rtsed.serve`` in a subprocess; ``url``/``ws_url``; ``stop(sig)`` -> exit code."""

    def __init__(self, *args: str, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        env = {**os.environ, "PYTHONPATH": str(REPO), "RTSED_ALLOCATOR": "system"}
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rtsed.serve", "--model", MODEL, "--port", str(self.port), "--log-level", "warning",
             *args], cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rtsed.serve exited with {self.proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if self.get_json("/health")["status"] == "ok":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"rtsed.serve did not come up in 120 s: {log_path.read_text()[-2000:]}")
            time.sleep(0.2)

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=5) as r:
            return json.loads(r.read())

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=5) as r:
            return r.read().decode()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        return stop_process(self.proc, self.log, sig, timeout_s)


def stop_process(proc: subprocess.Popen, log, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
    """Send ``sig`` (SIGKILL after ``timeout_s``), close its log file -> the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()
    return proc.returncode


def make_scene(seconds: float = 8.0, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A procedural scene (two noise swells, two warbles, a buzz) on which the bundled detector
    reports several events of several classes (rain, speech, sneezing); float32 (N,) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.003 * rng.standard_normal(t.shape)
    spectrum = np.fft.rfft(rng.standard_normal(t.size))
    spectrum /= np.sqrt(np.maximum(np.fft.rfftfreq(t.size, 1 / rate), 20.0))  # pink-ish
    noise = np.fft.irfft(spectrum, t.size)
    noise = 0.25 * noise / np.abs(noise).max()
    f = 500 + 150 * np.sin(2 * np.pi * 3 * t)
    warble = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / rate)
    buzz = 0.3 * ((t * 120) % 1 - 0.5)

    def span(a: float, b: float) -> np.ndarray:
        return (t > a) & (t < b)

    x += noise * span(0.3, 1.8) + warble * span(2.4, 3.2) + noise * span(3.9, 5.2)
    x += warble * span(6.0, 6.8) + buzz * span(7.0, 7.8)
    return x.astype(np.float32)


def write_scene_files(folder: Path) -> dict[str, Path]:
    """The scene as a 48 kHz stereo float WAV and a 16 kHz mono 16-bit WAV."""
    import soxr

    mono16 = make_scene()
    x48 = soxr.resample(mono16, 16000, 48000, quality="VHQ").astype(np.float32)
    stereo = np.stack([x48, 0.8 * x48], axis=1)
    paths = {"48k_stereo_f32": folder / "scene48.wav", "16k_mono_s16": folder / "scene16.wav"}
    sf.write(paths["48k_stereo_f32"], stereo, 48000, subtype="FLOAT")
    sf.write(paths["16k_mono_s16"], mono16, 16000, subtype="PCM_16")
    return paths


def detect_events(path: Path, backend: str = "torch") -> list[tuple[str, float, float]]:
    """What ``python -m rtsed.detect --backend BACKEND`` reports for the file (its library call)."""
    from rtsed.cli.detect import detect_file
    from rtsed.models.bundled import resolve_model
    from rtsed.serve.engine import make_stepper

    stepper, config, _ = make_stepper(resolve_model(MODEL), backend)
    events, _ = detect_file(path, stepper, config)
    return sorted((e.label, e.onset_s, e.offset_s) for e in events)


def file_payload(path: Path, fmt: str) -> tuple[dict, bytes]:
    """(header, bytes) of a WAV file in the wire format: f32le or s16le, interleaved."""
    if fmt == "s16le":
        data, rate = sf.read(path, dtype="int16", always_2d=True)
        raw = data.astype("<i2").tobytes()
    else:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
        raw = data.astype("<f4").tobytes()
    return {"sample_rate": rate, "channels": data.shape[1], "format": fmt}, raw


async def stream_file(ws_url: str, header: dict, payload: bytes, chunk_bytes: int = 3001,
                      pace_bytes_per_s: float | None = None, end: bool = True, timeout_s: float = 120.0) -> dict:
    """Stream bytes through one WebSocket and collect what comes back: {"messages", "events",
    "onsets", "frames", "close_code", "close_reason"}."""
    import websockets

    out: dict = {"messages": [], "events": [], "onsets": [], "frames": 0, "close_code": None, "close_reason": None}
    # No keepalive pings: on a machine loaded by other jobs the server may not answer one within
    # websockets' 20 s, and the test is about what the stream returns (timeout_s still bounds it).
    async with websockets.connect(ws_url, max_size=None, open_timeout=30, ping_interval=None) as ws:
        await ws.send(json.dumps(header))

        async def send():
            started = time.monotonic()
            for i in range(0, len(payload), chunk_bytes):
                await ws.send(payload[i:i + chunk_bytes])
                if pace_bytes_per_s:
                    ahead = (i + chunk_bytes) / pace_bytes_per_s - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            if end:
                await ws.send(json.dumps({"type": "end"}))

        async def receive():
            try:
                async for text in ws:
                    m = json.loads(text)
                    out["messages"].append(m)
                    if m["type"] == "event":
                        out["events"].append((m["label"], m["onset_s"], m["offset_s"]))
                    elif m["type"] == "onset":
                        out["onsets"].append((m["label"], m["onset_s"]))
                    elif m["type"] == "frames":
                        out["frames"] += 1
            except websockets.ConnectionClosed:
                pass

        sender = asyncio.create_task(send())
        await asyncio.wait_for(receive(), timeout_s)
        if not sender.done():
            sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        out["close_code"], out["close_reason"] = ws.close_code, ws.close_reason
    out["events"].sort()
    return out


def assert_same_events(got: list, expected: list, hop_s: float = 0.02) -> None:
    """Same labels, one to one, onsets within one hop."""
    assert [e[0] for e in got] == [e[0] for e in expected], f"labels differ:\n{got}\n{expected}"
    for a, b in zip(got, expected):
        assert abs(a[1] - b[1]) <= hop_s + 1e-6, f"onset {a} vs {b}"
