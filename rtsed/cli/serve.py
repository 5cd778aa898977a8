"""``python -m rtsed.serve --model dnd_7_10.pt``: detect sound events in many streams over the network.

    python -m rtsed.serve --model dnd_7_10.pt                         http://127.0.0.1:8000/
    python -m rtsed.serve --model dnd_7_10.pt --host 0.0.0.0 --port 8000 --backend onnx
    python -m rtsed.serve --model dnd_7_10.pt --mqtt mqtt://broker:1883 --webhook http://host/hook
    python -m rtsed.serve --model dnd_7_10.pt --nats nats://nats:4222     gateway to rtsed.worker processes

Clients open a WebSocket per stream at /ws (protocol: rtsed.serve.protocol), the page at / streams
the browser's microphone, /grid shows every stream, /health and /metrics (Prometheus) watch the
server. SIGINT/SIGTERM close every stream's open events and send them before the server stops.
--input URL pulls a stream itself (RTSP, HTTP, any FFmpeg input; rtsed.serve.pull);
--mqtt publishes onsets, events and on/off states per stream and class, with Home Assistant
discovery (rtsed.serve.mqtt); --webhook POSTs each finished event (rtsed.serve.webhook).
--nats makes the server a gateway: it runs no model, publishes every stream's audio to NATS and
relays the events of the ``python -m rtsed.worker`` processes back (rtsed.cluster, docs/cluster.md).
"""

from __future__ import annotations

import argparse
import logging
import sys

from rtsed.cli.engine_options import add_engine_arguments, check_numbers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rtsed.serve", description=__doc__.split("\n\n")[0])
    add_engine_arguments(p, "checkpoint (.pt), step graph (.onnx) or bundled detector name", 64,
                         "streams at once; more are refused (close 1013)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--batch-streams", type=int, default=16,
                   help="streams per batched model call; more streams open more batches")
    p.add_argument("--max-ahead-s", type=float, default=10.0,
                   help="how far a client's audio may run ahead of real time before it is closed as a flood")
    p.add_argument("--idle-timeout-s", type=float, default=10.0,
                   help="a stream with no audio for this long is ended (its events closed and sent)")
    p.add_argument("--send-timeout-s", type=float, default=10.0,
                   help="a client that takes no message for this long is closed as not reading")
    p.add_argument("--send-buffer-bytes", type=int, default=65536,
                   help="kernel send buffer per connection: bounds memory per client and how much a client "
                        "that does not read can leave unsent before --send-timeout-s starts counting")
    p.add_argument("--display-interval-s", type=float, default=0.1,
                   help="stream time between display messages (probabilities, log-mel, level)")
    p.add_argument("--input", metavar="URL", action="append", default=[],
                   help="pull a stream from this URL (rtsp://, http://, any FFmpeg input; repeatable); more can be "
                        "added with POST /streams")
    out = p.add_argument_group("detections out")
    out.add_argument("--mqtt", metavar="URL",
                     help="publish onsets, events and ON/OFF states to this MQTT broker, with Home Assistant "
                          "discovery: mqtt://[user:password@]host[:port] (mqtts:// for TLS)")
    out.add_argument("--mqtt-prefix", default="rtsed", help="topic prefix: PREFIX/STREAM/LABEL/{state,onset,event}")
    out.add_argument("--mqtt-discovery-prefix", default="homeassistant",
                     help="Home Assistant's discovery prefix (its MQTT integration's setting)")
    out.add_argument("--mqtt-reconnect-max-s", type=int, default=30,
                     help="longest wait between reconnection attempts to the broker (backoff from 1 s)")
    out.add_argument("--webhook", metavar="URL", help="POST each finished event as JSON to this http(s) URL")
    cluster = p.add_argument_group("gateway to NATS workers (docs/cluster.md)")
    cluster.add_argument("--nats", metavar="URL",
                         help="run no model here: publish each stream's audio to this NATS server (nats://host:4222) "
                              "for python -m rtsed.worker processes, and relay their events")
    cluster.add_argument("--nats-gateway-id", metavar="NAME",
                         help="this gateway's name in subjects (letters, digits, _ and -; default: random)")
    cluster.add_argument("--nats-block-s", type=float, default=0.04, help="audio per NATS message (default 0.04 s)")
    cluster.add_argument("--nats-end-timeout-s", type=float, default=30.0,
                         help="how long an ended stream waits for its worker's last events before it closes")
    cluster.add_argument("--nats-format", default="f32le", choices=("f32le", "s16le"),
                         help="sample format on NATS (s16le: half the bytes)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from rtsed.serve.server import ServeConfig, serve
        from rtsed.serve.session import SessionLimits
    except ImportError as exc:
        print(f"rtsed.serve: {exc.name or exc} is missing; install the server's extra: pip install 'rtsed[serve]'",
              file=sys.stderr)
        return 2
    from rtsed.models.bundled import ModelNotFoundError
    from rtsed.models.checkpoint import CheckpointError

    try:
        check_numbers(args, ("max_streams", "batch_streams", "frames_per_step", "send_buffer_bytes"),
                      ("max_ahead_s", "idle_timeout_s", "send_timeout_s", "display_interval_s"))
    except ValueError as exc:
        print(f"rtsed.serve: {exc}", file=sys.stderr)
        return 2
    mqtt = None
    try:
        if args.mqtt:
            from rtsed.serve.mqtt import parse_mqtt_url

            if args.mqtt_reconnect_max_s < 1:
                raise ValueError("--mqtt-reconnect-max-s must be >= 1")
            bad = [name for name, value in (("--mqtt-prefix", args.mqtt_prefix),
                                            ("--mqtt-discovery-prefix", args.mqtt_discovery_prefix))
                   if not value.strip("/") or any(c in value for c in "+#")]
            if bad:
                raise ValueError(f"{', '.join(bad)}: give a topic without + or # (e.g. rtsed)")
            mqtt = parse_mqtt_url(args.mqtt, topic_prefix=args.mqtt_prefix,
                                  discovery_prefix=args.mqtt_discovery_prefix,
                                  reconnect_max_s=args.mqtt_reconnect_max_s)
        if args.input:
            from rtsed.audio.network import is_url

            import av  # noqa: F401  (PyAV: a clear message now rather than in the server)

            files = [x for x in args.input if not is_url(x)]
            if files:
                raise ValueError(f"--input {files[0]!r}: give a URL (rtsp://, http://, ...); a file streams through "
                                 "a WebSocket client, or is detected offline by rtsed.detect")
            if len(args.input) > args.max_streams:
                raise ValueError(f"{len(args.input)} --input URLs but --max-streams {args.max_streams}: raise it")
        if args.webhook:
            from rtsed.serve.webhook import check_webhook_url

            check_webhook_url(args.webhook)
        make_worker = None
        if args.nats:
            make_worker = _gateway(args)
    except ImportError as exc:
        extra = "cluster" if args.nats else "serve"
        print(f"rtsed.serve: --mqtt/--input/--nats need {exc.name or exc}; install the extra: "
              f"pip install 'rtsed[{extra}]'", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"rtsed.serve: {exc}", file=sys.stderr)
        return 2
    if argv is None:
        from rtsed.backends.allocator import ensure_caching_allocator

        ensure_caching_allocator()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    limits = SessionLimits(max_ahead_s=args.max_ahead_s, max_queue_s=args.max_ahead_s + 5.0,
                           idle_timeout_s=args.idle_timeout_s, display_interval_s=args.display_interval_s)
    config = ServeConfig(model=args.model, backend=args.backend, device=args.device, threads=args.threads,
                         max_streams=args.max_streams, batch_streams=args.batch_streams,
                         frames_per_step=args.frames_per_step, limits=limits, send_timeout_s=args.send_timeout_s,
                         mqtt=mqtt, webhook_url=args.webhook, inputs=args.input)
    try:
        return serve(config, args.host, args.port, args.log_level, args.send_buffer_bytes, make_worker)
    except (ModelNotFoundError, CheckpointError, ValueError, OSError, RuntimeError) as exc:
        print(f"rtsed.serve: {exc}", file=sys.stderr)
        return 2


def _gateway(args):
    """The hook that makes this server a gateway (rtsed.cluster imports the server, not the
    reverse): a factory of the relay that replaces the local batching worker."""
    import nats  # noqa: F401  (a clear message now rather than in the server)

    from rtsed.cluster.gateway import GatewayRelay, NatsSettings
    from rtsed.cluster.subjects import check_token

    if not args.nats.startswith(("nats://", "tls://")):
        raise ValueError(f"--nats {args.nats!r}: give a NATS URL, e.g. nats://127.0.0.1:4222")
    for name in ("nats_block_s", "nats_end_timeout_s"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    options = dict(block_s=args.nats_block_s, sample_format=args.nats_format, end_timeout_s=args.nats_end_timeout_s)
    if args.nats_gateway_id:
        options["gateway_id"] = check_token(args.nats_gateway_id, "--nats-gateway-id")
    settings = NatsSettings(args.nats, **options)

    def make_worker(detector_config, metrics, outputs, config):
        return GatewayRelay(settings, detector_config, metrics, config.max_streams, outputs, config.limits)

    return make_worker


if __name__ == "__main__":
    sys.exit(main())
