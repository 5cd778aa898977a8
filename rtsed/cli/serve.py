"""``python -m rtsed.serve --model dnd_7_10.pt``: detect sound events in many streams over the network.

    python -m rtsed.serve --model dnd_7_10.pt                         http://127.0.0.1:8000/
    python -m rtsed.serve --model dnd_7_10.pt --host 0.0.0.0 --port 8000 --backend onnx

Clients open a WebSocket per stream at /ws (protocol: rtsed.serve.protocol), the page at / streams
the browser's microphone, /grid shows every stream, /health and /metrics (Prometheus) watch the
server. SIGINT/SIGTERM close every stream's open events and send them before the server stops.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rtsed.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint (.pt), step graph (.onnx) or bundled detector name")
    p.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="compute device")
    p.add_argument("--threads", type=int, default=1, help="compute threads of the model (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-streams", type=int, default=64, help="streams at once; more are refused (close 1013)")
    p.add_argument("--batch-streams", type=int, default=16,
                   help="streams per batched model call; more streams open more batches")
    p.add_argument("--frames-per-step", type=int, default=4, help="hops per model step (latency vs cost)")
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

    for name in ("max_streams", "batch_streams", "frames_per_step", "send_buffer_bytes"):
        if getattr(args, name) < 1:
            print(f"rtsed.serve: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    for name in ("max_ahead_s", "idle_timeout_s", "send_timeout_s", "display_interval_s"):
        if not getattr(args, name) > 0:
            print(f"rtsed.serve: --{name.replace('_', '-')} must be > 0", file=sys.stderr)
            return 2
    if argv is None:
        from rtsed.backends.allocator import ensure_caching_allocator

        ensure_caching_allocator()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    limits = SessionLimits(max_ahead_s=args.max_ahead_s, max_queue_s=args.max_ahead_s + 5.0,
                           idle_timeout_s=args.idle_timeout_s, display_interval_s=args.display_interval_s)
    config = ServeConfig(model=args.model, backend=args.backend, device=args.device, threads=args.threads,
                         max_streams=args.max_streams, batch_streams=args.batch_streams,
                         frames_per_step=args.frames_per_step, limits=limits, send_timeout_s=args.send_timeout_s)
    try:
        return serve(config, args.host, args.port, args.log_level, args.send_buffer_bytes)
    except (ModelNotFoundError, CheckpointError, ValueError, OSError, RuntimeError) as exc:
        print(f"rtsed.serve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
