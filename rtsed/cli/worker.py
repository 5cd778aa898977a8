"""``python -m rtsed.worker --model dnd_7_10.pt --nats nats://host:4222 --partition 0/2``: detect
sound events in one partition of the streams that ``rtsed.serve --nats`` gateways publish.

    python -m rtsed.worker --model dnd_7_10.pt --nats nats://nats:4222 --partition 0/2
    python -m rtsed.worker --model dnd_7_10.pt --nats nats://nats:4222 --partition 0/2 --partition 1/2   (standby)

The NATS server's subject mapping assigns streams to N partitions (docs/cluster.md); a worker owns
one partition at a time, the first free one it is given, and stands by while all are owned. A
worker that dies (its lease lapses after --lease-s) is replaced by a standby, which resumes every
stream from JetStream's retained audio. SIGINT/SIGTERM hand the partition over at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from rtsed.cli.engine_options import add_engine_arguments, check_numbers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rtsed.worker", description=__doc__.split("\n\n")[0])
    add_engine_arguments(p, "checkpoint (.pt) or bundled detector name", 16,
                         "streams of the partition run at once, batched in one model call (default 16)")
    p.add_argument("--nats", required=True, metavar="URL", help="the NATS server: nats://host:4222")
    p.add_argument("--partition", required=True, action="append", metavar="K/N",
                   help="a partition this worker may own (repeatable: the first free one is taken, the others "
                        "are stood by for)")
    p.add_argument("--retention-s", type=float, default=10.0,
                   help="audio JetStream keeps per stream for a takeover (a few receptive fields; default 10)")
    p.add_argument("--lease-s", type=float, default=3.0,
                   help="how long a dead worker's partition stays orphaned before a standby takes it")
    p.add_argument("--checkpoint-s", type=float, default=0.5,
                   help="stream time between the resume points written per stream")
    p.add_argument("--worker-id", default=f"{socket.gethostname()}-{os.getpid()}",
                   help="this worker's name in logs, leases and events (default host-pid)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics (steps, step latency, streams, queued audio) on this port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of --metrics-port (0.0.0.0: every interface)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import nats  # noqa: F401

        from rtsed.cluster.subjects import Partition
        from rtsed.cluster.worker import PartitionWorker, past_context_frames, receptive_field_s, run_worker
    except ImportError as exc:
        print(f"rtsed.worker: {exc.name or exc} is missing; install the cluster extra: pip install 'rtsed[cluster]'",
              file=sys.stderr)
        return 2
    from rtsed.models.bundled import ModelNotFoundError, resolve_model
    from rtsed.models.checkpoint import CheckpointError
    from rtsed.serve.steppers import make_stepper

    try:
        partitions = [Partition.parse(text) for text in args.partition]
        if len({p.count for p in partitions}) != 1:
            raise ValueError(f"--partition {' '.join(args.partition)}: every partition must be of the same N (the N "
                             "of the server's mapping)")
        check_numbers(args, ("max_streams", "frames_per_step", "threads"), ("retention_s", "lease_s", "checkpoint_s"))
        if not args.nats.startswith(("nats://", "tls://")):
            raise ValueError(f"--nats {args.nats!r}: give a NATS URL, e.g. nats://127.0.0.1:4222")
        path = resolve_model(args.model)
        if path.suffix == ".onnx":
            raise ValueError(f"{path}: give the .pt checkpoint (with --backend onnx if you like); the worker reads "
                             "the model's receptive field from it")
        stepper, config, model = make_stepper(path, args.backend, args.device, batch_size=args.max_streams,
                                              threads=args.threads)
        past = past_context_frames(model)
        field_s = receptive_field_s(past, stepper.lookahead_frames, config)
        needed_s = field_s + args.checkpoint_s + args.lease_s
        if args.retention_s < needed_s:
            raise ValueError(f"--retention-s {args.retention_s:g}: a takeover needs at least the receptive field "
                             f"({field_s:.2f} s) + --checkpoint-s + --lease-s = {needed_s:.2f} s of retained audio, "
                             "plus room for a backlog")
    except (ValueError, ModelNotFoundError, CheckpointError) as exc:
        print(f"rtsed.worker: {exc}", file=sys.stderr)
        return 2
    if argv is None:
        from rtsed.backends.allocator import ensure_caching_allocator

        ensure_caching_allocator()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    logging.getLogger("rtsed.worker").info(
        "model %s: receptive field %.2f s (%d past + %d lookahead frames), retention %.3g s", config.model.name,
        field_s, past, stepper.lookahead_frames, args.retention_s)
    metrics = None
    if args.metrics_port is not None:
        try:
            from rtsed.cluster.telemetry import WorkerMetrics

            metrics = WorkerMetrics()
            metrics.serve(args.metrics_port, args.metrics_host)
        except ImportError as exc:
            print(f"rtsed.worker: --metrics-port needs {exc.name or exc}: pip install 'rtsed[serve]'", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"rtsed.worker: --metrics-port {args.metrics_port}: {exc}; choose a free port", file=sys.stderr)
            return 2
    worker = PartitionWorker(stepper, config, past, args.nats, partitions, args.worker_id, args.frames_per_step,
                             args.retention_s, args.lease_s, args.checkpoint_s, metrics)
    try:
        run_worker(worker)
    except Exception as exc:  # NATS unreachable, refused, or JetStream not enabled
        print(f"rtsed.worker: {type(exc).__name__}: {exc}; is nats-server running at {args.nats} with JetStream "
              "enabled (docs/cluster.md)?", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
