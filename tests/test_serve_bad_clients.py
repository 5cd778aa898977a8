"""Bad clients against a real ``rtsed.serve``: each gets a close code and a reason that names the
problem and the fix, and a well-behaved stream running beside them keeps every event
(equal to rtsed.detect on its file)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import numpy as np

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install -e '.[serve]'")
websockets = pytest.importorskip("websockets", reason="the server tests need the serve extra")

from serve_helpers import ServerProcess, assert_same_events, detect_events, file_payload, stream_file  # noqa: E402
from serve_helpers import write_scene_files  # noqa: E402

MAX_STREAMS = 4


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scene_files(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess("--max-ahead-s", "12", "--idle-timeout-s", "5", "--send-timeout-s", "1.5",
                        "--send-buffer-bytes", "4096", "--max-streams", str(MAX_STREAMS), "--batch-streams", "2",
                        log_path=tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    srv.stop()


async def closed_with(url: str, first, then: list = (), read: bool = True) -> tuple[int, str, list]:
    """Send ``first`` (text or bytes) and ``then``, read until the close -> (code, reason, messages)."""
    messages = []
    async with websockets.connect(url, open_timeout=30) as ws:
        await ws.send(first)
        for item in then:
            await ws.send(item)
        try:
            async for text in ws:
                messages.append(json.loads(text))
        except websockets.ConnectionClosed:
            pass
        return ws.close_code, ws.close_reason, messages


def wait_until_idle(server, timeout_s: float = 30.0) -> None:
    """Until the streams of earlier tests have completed (a stream holds its slot until its last
    events are out), so that each test starts with every slot free."""
    deadline = time.monotonic() + timeout_s
    while server.get_json("/streams")["streams"]:
        assert time.monotonic() < deadline, "streams of an earlier test did not complete"
        time.sleep(0.05)


def handshake(port: int) -> bytes:
    return (f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def send_frame(sock: socket.socket, opcode: int, data: bytes) -> None:
    """One masked client frame (RFC 6455), written whole (the socket is non-blocking: the
    server reads, it only does not get read)."""
    mask = os.urandom(4)
    n = len(data)
    head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
                                     if n < 65536 else bytes([0x80 | 127]) + n.to_bytes(8, "big"))
    masked = (np.frombuffer(data, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
    frame = memoryview(head + mask + masked)
    while frame:
        try:
            frame = frame[sock.send(frame):]
        except BlockingIOError:
            time.sleep(0.01)


def test_malformed_header(server):
    code, reason, messages = asyncio.run(closed_with(server.ws_url, "{sample_rate: 48000"))
    assert code == 1007 and "header: not JSON" in reason and "send e.g." in reason
    assert messages and messages[-1]["type"] == "error" and "sample_rate" in messages[-1]["message"]


def test_unsupported_sample_format(server):
    code, reason, _ = asyncio.run(closed_with(server.ws_url, json.dumps(
        {"sample_rate": 48000, "channels": 1, "format": "f64le"})))
    assert code == 1007 and "format 'f64le' is not supported; use one of f32le, s16le, s32le" in reason


def test_binary_before_the_header(server):
    code, reason, _ = asyncio.run(closed_with(server.ws_url, b"\x00" * 640))
    assert code == 1003 and reason.startswith("binary audio before the header: send the JSON header")


def test_a_flood_faster_than_real_time_is_closed_with_its_events(server, scenes):
    header, payload = file_payload(scenes["16k_mono_s16"], "s16le")
    flood = payload * 3  # 24 s at once: 12 s past the 12 s allowed ahead of real time
    got = asyncio.run(stream_file(server.ws_url, header, flood, chunk_bytes=32000, end=False, timeout_s=60))
    assert got["close_code"] == 1008 and got["close_reason"].startswith("flood: audio arrives")
    assert "--max-ahead-s" in next(m for m in got["messages"] if m["type"] == "error")["message"]
    assert got["events"], "the audio taken before the flood was detected is still detected"


def test_connections_over_the_limit_are_refused_and_the_others_keep_running(server, scenes):
    header, payload = file_payload(scenes["16k_mono_s16"], "s16le")
    expected = detect_events(scenes["16k_mono_s16"])
    wait_until_idle(server)

    async def run():
        # MAX_STREAMS - 1 streams that hold a slot, one that streams the scene at 4x real time.
        holders = [await websockets.connect(server.ws_url) for _ in range(MAX_STREAMS - 1)]
        for ws in holders:
            await ws.send(json.dumps(header))
            await ws.recv()  # ready
        good = asyncio.create_task(stream_file(server.ws_url, header, payload, chunk_bytes=1280,
                                               pace_bytes_per_s=4 * 32000))
        await asyncio.sleep(0.5)
        refused = await closed_with(server.ws_url, json.dumps(header))
        for ws in holders:
            await ws.close()
        return refused, await good

    (code, reason, _), good = asyncio.run(run())
    assert code == 1013 and f"the server is full: {MAX_STREAMS} streams" in reason and "--max-streams" in reason
    assert good["close_code"] == 1000
    assert_same_events(good["events"], expected)


def test_a_client_that_never_reads_is_closed_and_the_others_keep_every_event(server, scenes):
    header, payload = file_payload(scenes["16k_mono_s16"], "s16le")
    header48, payload48 = file_payload(scenes["48k_stereo_f32"], "f32le")
    expected = detect_events(scenes["48k_stereo_f32"])
    wait_until_idle(server)

    async def never_reads():
        # A raw socket: a websockets client reads in the background whatever its application
        # does, so it cannot stop reading. A small receive buffer, so that the server's sends
        # block soon.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(handshake(server.port))
        response = b""
        while b"\r\n\r\n" not in response:  # the upgrade's answer: the last bytes this client reads
            response += sock.recv(1)
        assert response.startswith(b"HTTP/1.1 101"), response
        sock.setblocking(False)
        send_frame(sock, 0x1, json.dumps({**header, "name": "never-reads"}).encode())
        sent = 0
        started = time.monotonic()
        try:
            for _ in range(300):  # streams at real time after a 10 s burst, never reads
                target = int((10 + time.monotonic() - started) * 32000)
                if target > sent:
                    try:
                        send_frame(sock, 0x2, (payload * 10)[sent:target])
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the server has closed the connection: /streams says why
                    sent = target
                closed = [c for c in server.get_json("/streams")["closed"] if c["name"] == "never-reads"]
                if closed:
                    return closed[0]
                await asyncio.sleep(0.1)
            return None
        finally:
            sock.close()

    async def run():
        good = asyncio.create_task(stream_file(server.ws_url, header48, payload48, chunk_bytes=3840,
                                               pace_bytes_per_s=4 * 48000 * 8))
        bad = await never_reads()
        return bad, await good

    bad, good = asyncio.run(run())
    assert bad is not None, "the server never closed the client that does not read"
    assert bad["code"] == 1008 and bad["reason"].startswith("not reading:") and "read the server's messages" in bad["reason"]
    assert good["close_code"] == 1000
    assert_same_events(good["events"], expected)
    assert server.get_json("/health")["status"] == "ok"
