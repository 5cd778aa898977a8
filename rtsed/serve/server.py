"""The ASGI app of ``python -m rtsed.serve``: WebSocket streams in, events out, a web page,
health and metrics (starlette; run by uvicorn, see ``serve``).

Routes:
    GET /            the live page (microphone -> stream -> lanes, event roll, level, log-mel)
    GET /?watch=ID   the live page watching stream ID (any stream: a pulled one, another browser's)
    GET /grid        every live stream and its health
    GET /streams     the same as JSON (live streams and the last closed ones)
    POST /streams    pull a stream from a URL: {"url": "rtsp://...", "name": "porch"} -> 201 {"id", ...};
                     "reconnect": false ends it when the source ends or drops (a recording over HTTP)
    DELETE /streams/{id}  stop a pulled stream (its open events closed and emitted)
    GET /health      JSON: status, model, streams, steps/s (503 when the worker has failed)
    GET /metrics     Prometheus text
    WS  /ws          one stream (protocol: rtsed.serve.protocol)
    WS  /watch/{id}  a stream's messages, read-only: ``ready``, then what its client gets, up to ``end``

The event loop only moves bytes: each connection queues its audio in its session and drains
its outbox; decoding, resampling, the model and the decoder run on the worker thread
(rtsed.serve.worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from rtsed.serve.protocol import (CLOSE_GOING_AWAY, CLOSE_NO_STREAM, CLOSE_NORMAL, CLOSE_POLICY, CLOSE_TRY_LATER,
                                  CLOSE_UNSUPPORTED, HEADER_EXAMPLE, ProtocolError, close_reason, dumps, parse_header)
from rtsed.serve.session import Close, SessionLimits, StreamSession
from rtsed.serve.telemetry import ServerMetrics
from rtsed.serve.worker import BatchWorker, ServerFull

if TYPE_CHECKING:
    from rtsed.serve.mqtt import MqttSettings

log = logging.getLogger("rtsed.serve")
STATIC = Path(__file__).with_name("static")
SHUTDOWN_REASON = "server shutting down: open events closed and sent"


@dataclass
class ServeConfig:
    """What ``python -m rtsed.serve`` is asked for (its command-line options)."""

    model: str
    backend: str = "torch"
    device: str = "cpu"
    threads: int | None = 1
    max_streams: int = 64
    batch_streams: int = 16
    frames_per_step: int = 4
    limits: SessionLimits = field(default_factory=SessionLimits)
    header_timeout_s: float = 10.0
    send_timeout_s: float = 10.0
    shutdown_timeout_s: float = 10.0
    mqtt: MqttSettings | None = None  # --mqtt: publish onsets, events, states; Home Assistant discovery
    webhook_url: str | None = None  # --webhook: POST each finished event
    inputs: list[str] = field(default_factory=list)  # --input: URLs the server pulls itself


class ServerState:
    """What the routes share: the model's config, the worker, the metrics.

    make_worker: builds what runs the streams in place of the local ``BatchWorker``, from
    (detector config, metrics, event outputs, ServeConfig), with its interface (rtsed.cluster's
    gateway relays them to NATS workers); the model is then loaded for its config only."""

    def __init__(self, config: ServeConfig, make_worker: Callable | None = None):
        from rtsed.models.bundled import resolve_model
        from rtsed.serve.steppers import make_stepper

        self.config = config
        self.model_path = resolve_model(config.model)
        # Loaded once here (a bad model fails before the server listens), then per shard.
        first, self.detector_config, _ = make_stepper(self.model_path, config.backend, config.device,
                                                      batch_size=1 if make_worker else config.batch_streams,
                                                      threads=config.threads)
        spare = [first]
        self.lookahead_frames = first.lookahead_frames

        def stepper(batch_size: int):
            if spare and spare[0].batch_size == batch_size:
                return spare.pop()
            return make_stepper(self.model_path, config.backend, config.device, batch_size=batch_size,
                                threads=config.threads)[0]

        self.metrics = ServerMetrics()
        self.outputs = make_outputs(config, self.detector_config, self.metrics)
        if make_worker is None:
            self.worker = BatchWorker(stepper, self.detector_config, self.metrics, config.max_streams,
                                      config.batch_streams, config.frames_per_step, self.outputs, config.limits)
        else:
            spare.clear()
            self.worker = make_worker(self.detector_config, self.metrics, self.outputs, config)
        self.started = time.monotonic()
        self.connections = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pulled: dict = {}  # stream id -> PulledStream, while it runs

    def pull(self, url: str, name: str = "", reconnect: bool = True):
        """Start pulling ``url`` (ServerFull when the server is full); returns the PulledStream.
        It is forgotten once it has finished (stopped, or its source ended): it then appears
        among the closed streams only. Call on the event loop."""
        from rtsed.serve.pull import PulledStream

        fe = self.detector_config.frontend
        pulled = PulledStream(url, name, fe.sample_rate_hz, fe.hop_s, self.config.limits, self.loop, self.worker,
                              reconnect=reconnect)
        pulled.session.on_finished.append(lambda: self.pulled.pop(pulled.id, None))
        pulled.start()
        self.pulled[pulled.id] = pulled
        return pulled

    def ready_message(self, session: StreamSession) -> dict:
        c = self.detector_config
        from rtsed.serve.decode import EventDecoder

        decoder = EventDecoder(c.labels, c.frontend.hop_s, c.decoder, session.header.thresholds or None)
        return {"type": "ready", "stream": session.id, "name": session.name, "model": c.model.name,
                "labels": list(c.labels), "on": [round(float(v), 4) for v in decoder.on],
                "off": [round(float(v), 4) for v in decoder.off], "hop_s": c.frontend.hop_s,
                "model_rate": c.frontend.sample_rate_hz, "n_mels": c.model.n_mels,
                "lookahead_s": round(self.lookahead_frames * c.frontend.hop_s, 3),
                "display_interval_s": session.limits.display_interval_s}


def make_outputs(config: ServeConfig, detector_config, metrics: ServerMetrics) -> list:
    """The event outputs the command line asked for (not started yet)."""
    outputs = []
    if config.mqtt is not None:
        from rtsed.serve.mqtt import MqttPublisher

        outputs.append(MqttPublisher(config.mqtt, detector_config.labels, detector_config.model.name, metrics))
    if config.webhook_url:
        from rtsed.serve.webhook import WebhookPoster

        outputs.append(WebhookPoster(config.webhook_url, metrics))
    return outputs


def create_app(config: ServeConfig, make_worker: Callable | None = None) -> Starlette:
    state = ServerState(config, make_worker)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.loop = asyncio.get_running_loop()
        for output in state.outputs:
            output.start()  # returns at once; a broker that is down is retried in the background
        state.worker.start()
        for url in config.inputs:
            pulled = state.pull(url)
            log.info("pulling stream %d from %s", pulled.id, pulled.session.details["url"])
        try:
            yield
        finally:
            # Normally drained already (GracefulServer); this covers other ways of stopping.
            await asyncio.to_thread(state.worker.stop, SHUTDOWN_REASON, CLOSE_GOING_AWAY, config.shutdown_timeout_s)
            for pulled in list(state.pulled.values()):
                pulled.stop(SHUTDOWN_REASON)
            # Every stream has ended (its last events and OFF states queued): send them, then stop.
            for output in state.outputs:
                await asyncio.to_thread(output.close, config.shutdown_timeout_s / 2)

    async def index(request: Request):
        return FileResponse(STATIC / "index.html")

    async def grid(request: Request):
        return FileResponse(STATIC / "grid.html")

    async def health(request: Request):
        alive = state.worker.is_alive() and state.worker.error is None
        body = {"status": "ok" if alive else "error", "model": state.detector_config.model.name,
                "model_path": str(state.model_path), "backend": config.backend,
                "labels": list(state.detector_config.labels),
                "streams": len(state.worker.sessions), "max_streams": config.max_streams,
                "steps_per_s": round(state.worker.steps_per_s(), 2),
                "uptime_s": round(time.monotonic() - state.started, 1)}
        if not alive:
            body["error"] = repr(state.worker.error) if state.worker.error else "worker thread not running"
        return JSONResponse(body, status_code=200 if alive else 503)

    async def streams(request: Request):
        return JSONResponse({"streams": state.worker.snapshot(), "closed": list(state.worker.closed_recently),
                             "max_streams": config.max_streams, "labels": list(state.detector_config.labels)})

    async def add_stream(request: Request):
        from rtsed.serve.pull import check_api_url

        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return JSONResponse({"error": 'send a JSON object: {"url": "rtsp://camera/stream", "name": "porch"}'},
                                status_code=400)
        unknown = sorted(set(body) - {"url", "name", "reconnect"})
        name = body.get("name", "")
        reconnect = body.get("reconnect", True)
        try:
            if unknown:
                raise ValueError(f"unknown field(s) {unknown}; the fields are url, name and reconnect")
            if not isinstance(name, str) or len(name) > 100:
                raise ValueError("name: give a string of at most 100 characters")
            if not isinstance(reconnect, bool):
                raise ValueError("reconnect: give true (reconnect after a drop, the default) or false (end the "
                                 "stream when the source ends or drops)")
            url = check_api_url(body.get("url"))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        try:
            pulled = state.pull(url, name, reconnect)
        except ServerFull as exc:
            return JSONResponse({"error": f"{exc}; stop a stream (DELETE /streams/ID) or start the server with a "
                                          "larger --max-streams"}, status_code=503)
        return JSONResponse({"id": pulled.id, "name": pulled.session.name, "url": pulled.session.details["url"]},
                            status_code=201)

    async def delete_stream(request: Request):
        stream_id = request.path_params["stream_id"]
        pulled = state.pulled.pop(stream_id, None)
        if pulled is None:
            closed = next((c for c in state.worker.closed_recently if c["id"] == stream_id), None)
            if closed is not None:
                return JSONResponse({"error": f"stream {stream_id} has already ended ({closed['reason']}): GET "
                                              "/streams lists it among the closed streams"}, status_code=404)
            return JSONResponse({"error": f"no pulled stream {stream_id}: GET /streams lists the streams (a "
                                          'WebSocket stream ends when its client sends {"type": "end"})'},
                                status_code=404)
        pulled.stop()
        ended = await asyncio.to_thread(pulled.session.finished.wait, config.shutdown_timeout_s)
        s = pulled.session
        return JSONResponse({"id": s.id, "ended": ended, "events": s.events,
                             "audio_s": round(s.model_samples / s.model_rate_hz, 3)})

    async def metrics(request: Request):
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def stream(ws: WebSocket):
        state.connections += 1
        try:
            await _serve_stream(ws, state)
        finally:
            state.connections -= 1

    async def watch(ws: WebSocket):
        state.connections += 1
        try:
            await _watch_stream(ws, state, ws.path_params["stream_id"])
        finally:
            state.connections -= 1

    app = Starlette(routes=[
        Route("/", index), Route("/grid", grid), Route("/health", health),
        Route("/streams", streams, methods=["GET"]), Route("/streams", add_stream, methods=["POST"]),
        Route("/streams/{stream_id:int}", delete_stream, methods=["DELETE"]),
        Route("/metrics", metrics), WebSocketRoute("/ws", stream),
        WebSocketRoute("/watch/{stream_id:int}", watch),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ], lifespan=lifespan)
    app.state.rtsed = state
    return app


async def _refuse(ws: WebSocket, error: ProtocolError) -> None:
    """Tell a client what was wrong (whole, as an error message) and close with the reason."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.send_text(dumps({"type": "error", "message": error.message})), 2.0)
        await asyncio.wait_for(ws.close(error.code, close_reason(error.message)), 2.0)


async def _serve_stream(ws: WebSocket, state: ServerState) -> None:
    config = state.config
    await ws.accept()
    try:
        first = await asyncio.wait_for(ws.receive(), config.header_timeout_s)
    except asyncio.TimeoutError:
        await _refuse(ws, ProtocolError(CLOSE_POLICY, f"no header within {config.header_timeout_s:g} s: send the "
                                                      f"JSON header first, e.g. {HEADER_EXAMPLE}"))
        return
    if first["type"] == "websocket.disconnect":
        return
    if first.get("text") is None:
        await _refuse(ws, ProtocolError(CLOSE_UNSUPPORTED, "binary audio before the header: send the JSON header "
                                                           f"as a text message first, e.g. {HEADER_EXAMPLE}"))
        return
    try:
        header = parse_header(first["text"], state.detector_config.labels)
    except ProtocolError as exc:
        await _refuse(ws, exc)
        return
    client = f"{ws.client.host}:{ws.client.port}" if ws.client else ""
    fe = state.detector_config.frontend
    session = StreamSession(header, fe.sample_rate_hz, fe.hop_s, config.limits, asyncio.get_running_loop(), client)
    try:
        state.worker.add(session)
    except ServerFull as exc:
        await _refuse(ws, ProtocolError(CLOSE_TRY_LATER, f"{exc}; retry later, or start the server with a larger "
                                                         "--max-streams"))
        return
    session.send(state.ready_message(session))
    sender = asyncio.create_task(_send_loop(ws, session, state))
    receiver = asyncio.create_task(_receive_loop(ws, session, state))
    done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
    behind = None
    if receiver in done and not session.client_gone:
        # The stream is ending (end message, flood): its last events are on their way.
        wait_s = config.shutdown_timeout_s + config.send_timeout_s + state.worker.end_grace_s
        try:
            await asyncio.wait_for(asyncio.shield(sender), wait_s)
        except asyncio.TimeoutError:
            behind = f"server behind: last events not ready {wait_s:g} s after the stream's end; retry later"
            session.client_gone = True  # nothing more is queued for this socket
    for task in (sender, receiver):
        task.cancel()
    await asyncio.gather(sender, receiver, return_exceptions=True)
    if behind is not None:
        # A close frame with the reason: returning without one would drop the TCP connection
        # (the client would see 1006 and no reason).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(CLOSE_TRY_LATER, close_reason(behind)), 2.0)


async def _watch_stream(ws: WebSocket, state: ServerState, stream_id: int) -> None:
    """A read-only view of one stream: its ``ready`` message (``"watching": true``), then every
    message its client gets from now on, up to ``end``; then a 1000 close. The viewer's messages
    are ignored; a viewer that does not read is closed as a client that does not read."""
    await ws.accept()
    session = state.worker.sessions.get(stream_id)
    if session is None or session.finished.is_set():
        closed = next((c for c in state.worker.closed_recently if c["id"] == stream_id), None)
        why = (f"stream {stream_id} has ended ({closed['reason']})" if closed is not None
               else f"no live stream {stream_id}")
        await _refuse(ws, ProtocolError(CLOSE_NO_STREAM, f"{why}: GET /streams lists the live streams"))
        return
    watcher = session.watch()
    try:
        await ws.send_text(dumps({**state.ready_message(session), "watching": True,
                                  "source": session.details.get("url") or session.client}))

        async def forward():
            timeout = state.config.send_timeout_s
            while True:
                text = await watcher.queue.get()
                await asyncio.wait_for(ws.send_text(text), timeout)
                if text.startswith('{"type":"end"'):
                    await asyncio.wait_for(ws.close(CLOSE_NORMAL, "the stream ended"), 2.0)
                    return

        async def drain():
            while (await ws.receive())["type"] != "websocket.disconnect":
                pass

        tasks = {asyncio.create_task(forward()), asyncio.create_task(drain())}
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if any(isinstance(t.exception(), asyncio.TimeoutError) for t in done if not t.cancelled()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(CLOSE_POLICY, "not reading: read the messages as they arrive"), 1.0)
    finally:
        session.watchers.discard(watcher)


async def _receive_loop(ws: WebSocket, session: StreamSession, state: ServerState) -> None:
    worker = state.worker
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            session.client_gone = True
            session.request_end(CLOSE_NORMAL, "client disconnected")
            worker.wake.set()
            return
        data = message.get("bytes")
        if data is not None:
            if session.end_code is not None:
                continue  # ending: audio after the end is not part of the stream
            try:
                session.offer(data)
            except ProtocolError as exc:
                session.send({"type": "error", "message": exc.message})
                session.request_end(exc.code, exc.message)
                worker.wake.set()
                return
            worker.wake.set()
            continue
        text = (message.get("text") or "").strip()
        if text in ('{"type":"end"}', '{"type": "end"}') or _is_end(text):
            session.request_end(CLOSE_NORMAL, "client ended the stream")
            worker.wake.set()
            return
        session.send({"type": "warning", "message": 'after the header the server understands binary audio and '
                                                    '{"type": "end"}; this text message was ignored'})


def _is_end(text: str) -> bool:
    import json

    try:
        data = json.loads(text)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("type") == "end"


async def _send_loop(ws: WebSocket, session: StreamSession, state: ServerState) -> None:
    timeout = state.config.send_timeout_s
    while True:
        item = await session.outbox.get()
        if isinstance(item, Close):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(item.code or CLOSE_NORMAL, close_reason(item.reason)), 2.0)
            return
        try:
            await asyncio.wait_for(ws.send_text(item), timeout)
        except asyncio.TimeoutError:
            # The client's socket has not taken a message for `timeout` seconds: it does not
            # read. Nothing more can reach it; its stream ends and its memory is freed.
            reason = (f"not reading: a message waited {timeout:g} s to be sent; read the server's messages as "
                      "they arrive (or raise --send-timeout-s)")
            session.request_end(CLOSE_POLICY, reason)
            session.client_gone = True
            state.worker.wake.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(CLOSE_POLICY, close_reason(reason)), 1.0)
            return
        except Exception:  # the client went away mid-send
            session.client_gone = True
            session.request_end(CLOSE_NORMAL, "client disconnected")
            state.worker.wake.set()
            return


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          send_buffer_bytes: int = 65536, make_worker: Callable | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; every stream's open events are closed and sent
    before the sockets close.

    send_buffer_bytes: the kernel send buffer of each connection (SO_SNDBUF, inherited from the
    listening socket). A stream's output is about 10 kB/s, so 64 KiB covers seconds of network
    delay; without a bound the kernel grows a client's buffer to megabytes before a client that
    does not read blocks a send (--send-timeout-s counts from then)."""
    import socket

    app = create_app(config, make_worker)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    sock.bind((host, port))
    server = GracefulServer(uvicorn.Config(app, host=host, port=port, ws="websockets-sansio", log_level=log_level,
                                           ws_max_size=4 * 1024 * 1024, lifespan="on"))
    server.run(sockets=[sock])
    return 1 if app.state.rtsed.worker.error else 0


class GracefulServer(uvicorn.Server):
    """uvicorn's server, with a first SIGINT/SIGTERM that ends every stream first (events closed
    and sent, sockets closed with 1001) and then stops as uvicorn does; a second SIGINT forces."""

    _draining = False

    def handle_exit(self, sig, frame) -> None:
        state = _find_state(self.config.app)
        if self._draining or state is None or state.loop is None:
            return super().handle_exit(sig, frame)
        self._draining = True
        log.info("%s: ending %d stream(s), then stopping", signal.Signals(sig).name, len(state.worker.sessions))
        state.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain(state, sig, frame)))

    async def _drain(self, state: ServerState, sig, frame) -> None:
        config = state.config
        await asyncio.to_thread(state.worker.stop, SHUTDOWN_REASON, CLOSE_GOING_AWAY, config.shutdown_timeout_s)
        deadline = time.monotonic() + config.shutdown_timeout_s
        while state.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # a clean exit, not the signal re-raised


def _find_state(app) -> ServerState | None:
    return getattr(getattr(app, "state", None), "rtsed", None)
