"""The model and engine options that ``rtsed.serve`` and ``rtsed.worker`` share (both batch
streams through one ``MultiStreamEngine``), and the check of their numbers."""

from __future__ import annotations

import argparse


def add_engine_arguments(p: argparse.ArgumentParser, model_help: str, max_streams_default: int,
                         max_streams_help: str) -> None:
    """--model, --backend, --device, --threads, --max-streams, --frames-per-step."""
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="compute device")
    p.add_argument("--threads", type=int, default=1, help="compute threads of the model (default 1)")
    p.add_argument("--max-streams", type=int, default=max_streams_default, help=max_streams_help)
    p.add_argument("--frames-per-step", type=int, default=4, help="hops per model step (latency vs cost)")


def check_numbers(args: argparse.Namespace, at_least_one: tuple[str, ...] = (),
                  above_zero: tuple[str, ...] = ()) -> None:
    """ValueError naming the first option (by its attribute name) out of range."""
    for name in at_least_one:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    for name in above_zero:
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
