"""Streams pulled from URLs (``rtsed.serve --input URL``, ``POST /streams``, ``rtsed.live --input
URL``) through PyAV, from real servers on loopback: ffmpeg serving a scene over HTTP, and
GStreamer's RTSP server. The events equal ``rtsed.detect``'s on the same file; a source killed
mid-stream is reconnected and the stream goes on."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("av", reason="URL inputs need PyAV: pip install -e '.[serve]'")
pytest.importorskip("starlette", reason="the server needs the serve extra: pip install -e '.[serve]'")

from outputs_helpers import HookServer, wait_until  # noqa: E402
from serve_helpers import MODEL, REPO, ServerProcess, detect_events, free_port, make_scene  # noqa: E402
from rtsed.audio.network import is_url, redact  # noqa: E402
from rtsed.serve.pull import check_api_url  # noqa: E402

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="no ffmpeg binary: apt-get install ffmpeg")
SYSTEM_PYTHON = "/usr/bin/python3"


def _has_rtsp_server() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             "assert Gst.ElementFactory.find('rtpL16pay') and Gst.ElementFactory.find('wavparse')")
    return subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """The test scene at 48 kHz stereo float (resampled and downmixed on the way in), with 3 s
    of quiet at the end: a stream that ends and is pulled again starts over, and the quiet
    leaves time to stop it between the last event and the replay."""
    import soxr

    x = soxr.resample(make_scene(), 16000, 48000, quality="VHQ").astype(np.float32)
    x = np.concatenate([x, 0.0005 * np.random.default_rng(1).standard_normal(3 * 48000).astype(np.float32)])
    path = tmp_path_factory.mktemp("scene") / "scene48.wav"
    sf.write(path, np.stack([x, 0.8 * x], axis=1), 48000, subtype="FLOAT")
    return path


@pytest.fixture(scope="module")
def expected(scene):
    events = detect_events(scene)
    assert len(events) >= 5
    return events


def listening(port: int) -> bool:
    """Whether something listens on TCP ``port`` (read from /proc: a probe connection would be
    the one client that ``ffmpeg -listen 1`` serves)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        if any(int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A" for f in (line.split() for line in lines)):
            return True
    return False


def ffmpeg_http(path: Path, port: int, realtime: bool) -> subprocess.Popen:
    """ffmpeg as an HTTP server: one client gets the file as a WAV stream (float samples)."""
    proc = subprocess.Popen([FFMPEG, "-nostdin", "-loglevel", "error", *(["-re"] if realtime else []), "-i", str(path),
                             "-c:a", "pcm_f32le", "-f", "wav", "-listen", "1", f"http://127.0.0.1:{port}/scene.wav"])
    wait_until(lambda: listening(port) or proc.poll() is not None, 10, "ffmpeg to listen")
    assert proc.poll() is None, "ffmpeg exited before serving"
    return proc


def same_events(got: list, expected: list, tolerance_s: float = 0.1) -> None:
    """Labels equal one to one, onsets within ``tolerance_s``."""
    got, expected = sorted(got), sorted(expected)
    assert [e[0] for e in got] == [e[0] for e in expected], f"labels differ:\n{got}\n{expected}"
    for a, b in zip(got, expected):
        assert abs(a[1] - b[1]) <= tolerance_s, f"onset {a} vs {b}"


def request(url: str, method: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def stream_info(server: ServerProcess, stream_id: int) -> dict | None:
    return next((s for s in server.get_json("/streams")["streams"] if s["id"] == stream_id), None)


def stop_stream(server: ServerProcess, stream_id: int) -> dict:
    """DELETE the stream, then its entry among the closed streams once the worker has finished
    it (the DELETE answers after at most the shutdown timeout, finished or not)."""
    status, body = request(f"{server.url}/streams/{stream_id}", "DELETE")
    assert status == 200 and body["id"] == stream_id
    return wait_until(lambda: next((c for c in server.get_json("/streams")["closed"] if c["id"] == stream_id), None),
                      120, f"stream {stream_id} to finish")


# ------------------------------------------------------------------------------ units
def test_urls_are_told_from_files_and_checked_for_the_api():
    assert is_url("rtsp://cam/1") and is_url("http://h/a.wav") and not is_url("scene.wav")
    assert not is_url("C://x.wav") and not is_url("/tmp/a.wav")
    assert redact("rtsp://admin:secret@cam:554/1") == "rtsp://admin:***@cam:554/1"
    assert check_api_url("rtsp://cam/1") == "rtsp://cam/1"
    for bad, problem in (("file:///etc/passwd", "scheme 'file'"), ("/dev/snd", "scheme '(none)'"), (3, "give")):
        with pytest.raises(ValueError, match=re.escape(problem)):
            check_api_url(bad)


# ------------------------------------------------------------------------------ real sources
@needs_ffmpeg
def test_live_pulls_a_url_with_the_same_source(scene, expected, tmp_path):
    """rtsed.live --input http://... (ffmpeg serving the file): the events of rtsed.detect."""
    port = free_port()
    ffmpeg = ffmpeg_http(scene, port, realtime=False)
    try:
        out = subprocess.run([sys.executable, "-m", "rtsed.live", "--model", MODEL, "--input",
                              f"http://127.0.0.1:{port}/scene.wav", "--no-reconnect", "--jsonl", "-", "--no-view"],
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "RTSED_ALLOCATOR": "system"},
                             capture_output=True, text=True, timeout=300)
    finally:
        ffmpeg.kill()
        ffmpeg.wait()
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    same_events([(m["label"], m["onset_s"], m["offset_s"]) for m in lines if m["type"] == "event"], expected)


@needs_ffmpeg
def test_server_pulls_urls_and_reconnects_a_source_killed_mid_stream(scene, expected, tmp_path):
    hook = HookServer()
    port = free_port()
    ffmpeg = ffmpeg_http(scene, port, realtime=False)
    server = ServerProcess("--input", f"http://127.0.0.1:{port}/scene.wav", "--webhook", hook.url,
                           log_path=tmp_path / "server.log")
    killed = None
    try:
        # 1. --input URL, as fast as ffmpeg serves it: the events of rtsed.detect on the file.
        first = wait_until(lambda: server.get_json("/streams")["streams"], 30, "the pulled stream")[0]
        assert first["url"] == f"http://127.0.0.1:{port}/scene.wav" and first["client"] == "pull"
        wait_until(lambda: (stream_info(server, first["id"]) or {}).get("audio_s", 0) >= 10.99, 120,
                   "the whole file to be detected")
        closed = stop_stream(server, first["id"])
        assert closed["events"] == len(expected) and closed["reason"] == "stopped over the API"
        wait_until(lambda: len(hook.bodies) == len(expected), 30, "the webhook's events")
        same_events([(b["label"], b["onset_s"], b["offset_s"]) for b in hook.bodies], expected)

        # 2. POST /streams at real time; ffmpeg is killed mid-stream and started again: the
        #    stream reconnects and goes on, on the same timeline.
        ffmpeg.wait(10)
        ffmpeg = ffmpeg_http(scene, port, realtime=True)
        status, body = request(f"{server.url}/streams", "POST", {"url": f"http://127.0.0.1:{port}/scene.wav",
                                                                 "name": "porch"})
        assert status == 201 and body["name"] == "porch"
        sid = body["id"]
        before = wait_until(lambda: (s := stream_info(server, sid)) and s["audio_s"] >= 2.0 and s, 60, "2 s of audio")
        assert before["connected"]
        ffmpeg.send_signal(signal.SIGKILL)
        killed = ffmpeg.wait(10)
        ffmpeg = ffmpeg_http(scene, port, realtime=True)
        after = wait_until(lambda: (s := stream_info(server, sid)) and s["connected"] and s["reconnects"] >= 1
                           and s["audio_s"] >= before["audio_s"] + 2.0 and s, 60,
                           "the stream to go on after reconnecting")
        assert after["state"] == "live"
        assert "reconnecting in" in server.log_path.read_text()
        assert stop_stream(server, sid)["audio_s"] >= after["audio_s"]

        # 3. The API refuses what it cannot pull, naming the fix.
        status, body = request(f"{server.url}/streams", "POST", {"url": "file:///etc/passwd"})
        assert status == 400 and "is not pulled over the API" in body["error"]
        status, body = request(f"{server.url}/streams", "POST", {"uri": "rtsp://x"})
        assert status == 400 and "unknown field(s) ['uri']" in body["error"]
        status, body = request(f"{server.url}/streams/{sid}", "DELETE")
        assert status == 404 and "GET /streams lists" in body["error"]
    finally:
        server.stop()
        ffmpeg.kill()
        ffmpeg.wait()
        hook.close()
    assert killed == -signal.SIGKILL


@needs_ffmpeg
@pytest.mark.skipif(not _has_rtsp_server(), reason="no RTSP server: apt-get install python3-gi "
                    "gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good")
def test_server_pulls_an_rtsp_stream(scene, expected, tmp_path):
    """GStreamer's RTSP server streams the file at real time (RTP, L16, over TCP): the events of
    rtsed.detect on the same file."""
    port = free_port()
    rtsp = subprocess.Popen([SYSTEM_PYTHON, str(REPO / "tests" / "rtsp_server.py"), str(port), str(scene)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    hook = HookServer()
    server = None
    try:
        assert rtsp.stdout.readline().strip() == "ready"
        server = ServerProcess("--webhook", hook.url, log_path=tmp_path / "server.log")
        status, body = request(f"{server.url}/streams", "POST", {"url": f"rtsp://127.0.0.1:{port}/scene"})
        assert status == 201
        # The scene's last event ends by 8 s; its 3 s of quiet end before a replay could begin.
        wait_until(lambda: (stream_info(server, body["id"]) or {}).get("audio_s", 0) >= 9.5, 60, "9.5 s of audio")
        assert stop_stream(server, body["id"])["events"] == len(expected)
        wait_until(lambda: len(hook.bodies) == len(expected), 30, "the webhook's events")
        same_events([(b["label"], b["onset_s"], b["offset_s"]) for b in hook.bodies], expected)
    finally:
        if server is not None:
            server.stop()
        rtsp.kill()
        rtsp.wait()
        hook.close()


async def watch_stream(ws_url: str, timeout_s: float = 120.0) -> dict:
    """A viewer on /watch/ID (what the page's ?watch=ID opens): every message until the close."""
    import asyncio

    import websockets

    out: dict = {"messages": []}
    async with websockets.connect(ws_url, max_size=None, open_timeout=30, ping_interval=None) as ws:
        async def read():
            try:
                async for text in ws:
                    out["messages"].append(json.loads(text))
            except websockets.ConnectionClosed:
                pass

        await asyncio.wait_for(read(), timeout_s)
        out["close_code"], out["close_reason"] = ws.close_code, ws.close_reason
    return out


@needs_ffmpeg
def test_a_pulled_stream_is_watched_and_forgotten_once_its_source_ends(scene, expected, tmp_path):
    """POST /streams with "reconnect": false, ffmpeg serving the file at real time: a viewer of
    the stream (/watch/ID, the page's view) gets its ready message, display frames, the events of
    rtsed.detect and its end, then a 1000 close. The stream ends with its source: it is no longer
    live, it is listed among the closed streams with its URL, and DELETE says it has ended."""
    import asyncio

    port = free_port()
    ffmpeg = ffmpeg_http(scene, port, realtime=True)
    server = ServerProcess(log_path=tmp_path / "server.log")
    try:
        url = f"http://127.0.0.1:{port}/scene.wav"
        status, body = request(f"{server.url}/streams", "POST", {"url": url, "name": "porch", "reconnect": False})
        assert status == 201
        sid = body["id"]
        ws_base = server.ws_url.rsplit("/", 1)[0]
        got = asyncio.run(watch_stream(f"{ws_base}/watch/{sid}"))
        closed = wait_until(lambda: next((c for c in server.get_json("/streams")["closed"] if c["id"] == sid), None),
                            60, "the stream among the closed ones")
        assert all(s["id"] != sid for s in server.get_json("/streams")["streams"])
        status, gone = request(f"{server.url}/streams/{sid}", "DELETE")
        unknown = asyncio.run(watch_stream(f"{ws_base}/watch/{sid + 100}"))
        bad_status, bad = request(f"{server.url}/streams", "POST", {"url": url, "reconnect": "no"})
    finally:
        server.stop()
        ffmpeg.kill()
        ffmpeg.wait()
    ready = got["messages"][0]
    assert ready["type"] == "ready" and ready["watching"] and ready["stream"] == sid and ready["name"] == "porch"
    assert ready["source"] == url and len(ready["labels"]) == 12
    # Display frames up to the stream's end (one message may carry several rows when the worker
    # steps a backlog at once), a probability per class in each row.
    frames = [m for m in got["messages"] if m["type"] == "frames" and m["probs"]]
    assert frames and all(len(row) == 12 for m in frames for row in m["probs"])
    assert frames[-1]["t_s"] + len(frames[-1]["probs"]) * ready["hop_s"] >= 10.9
    events = [(m["label"], m["onset_s"], m["offset_s"]) for m in got["messages"] if m["type"] == "event"]
    same_events(events, expected)
    assert got["messages"][-1]["type"] == "end"
    assert (got["close_code"], got["close_reason"]) == (1000, "the stream ended")
    assert closed["url"] == url and closed["events"] == len(expected) and closed["audio_s"] >= 10.9
    assert status == 404 and f"stream {sid} has already ended" in gone["error"]
    assert unknown["close_code"] == 4404 and f"no live stream {sid + 100}" in unknown["close_reason"]
    assert bad_status == 400 and "reconnect: give true" in bad["error"]
