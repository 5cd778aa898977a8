"""``python -m rtsed.live --model dnd_7_10.pt``: listen and report sound events as they happen.

    python -m rtsed.live --model dnd_7_10.pt                      default microphone
    python -m rtsed.live --model dnd_7_10.pt --input-device 3     a chosen input (index or name)
    python -m rtsed.live --list-devices
    python -m rtsed.live --model dnd_7_10.pt --input scene.wav --realtime
    python -m rtsed.live --model dnd_7_10.pt --input rtsp://camera.lan/stream1
    python -m rtsed.live --model dnd_7_10.pt --jsonl - | my-consumer

The PortAudio callback only copies samples into a ring buffer (rtsed.audio.sources); this thread runs
front end, model and decoder (rtsed.serve.engine). Ctrl-C (or the end of a file) closes open events and
writes the DCASE TSV and Audacity label files. Times count from the stream's first sample.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import TextIO

from rtsed.serve.decode import OnsetNotice, SoundEvent, event_to_json, write_audacity_labels, write_dcase_tsv
from rtsed.backends.precision import PRECISIONS


def parse_thresholds(items: list[str]) -> dict[str, float | tuple[float, float]]:
    """``--threshold dog=0.6`` or ``--threshold dog=0.7:0.4`` (on:off) -> decoder overrides."""
    out: dict[str, float | tuple[float, float]] = {}
    for item in items:
        label, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            on, _, off = value.partition(":")
            out[label] = (float(on), float(off)) if off else float(on)
        except ValueError:
            raise SystemExit(f"--threshold {item!r}: write LABEL=ON or LABEL=ON:OFF, e.g. dog=0.7:0.4") from None
    return out


class EventSinks:
    """Where events go: JSONL (stdout or a file) as they happen; TSV and Audacity labels at exit."""

    def __init__(self, jsonl: str | None, tsv: str | None, audacity: str | None, stream_name: str):
        self.jsonl: TextIO | None = None
        if jsonl == "-":
            self.jsonl = sys.stdout
        elif jsonl:
            self.jsonl = open(jsonl, "a", encoding="utf-8")
        self.tsv, self.audacity, self.stream_name = tsv, audacity, stream_name
        self.events: list[SoundEvent] = []
        self.recent: deque[str] = deque(maxlen=8)

    def emit(self, item: OnsetNotice | SoundEvent) -> None:
        if isinstance(item, SoundEvent):
            self.events.append(item)
            self.recent.appendleft(f"{item.onset_s:8.2f}-{item.offset_s:8.2f} s  {item.label}  ({item.score:.2f})")
        if self.jsonl is not None:
            try:
                self.jsonl.write(json.dumps(event_to_json(item)) + "\n")
                self.jsonl.flush()
            except BrokenPipeError:
                # The consumer went away (e.g. `| head`): stop writing JSONL, keep detecting so
                # the TSV/Audacity files still get every event.
                print("rtsed.live: JSONL reader closed the pipe; JSONL output stopped", file=sys.stderr)
                self.jsonl = None

    def close(self) -> None:
        if self.tsv:
            write_dcase_tsv(self.tsv, [(self.stream_name, e) for e in self.events])
        if self.audacity:
            write_audacity_labels(self.audacity, self.events)
        if self.jsonl is not None and self.jsonl is not sys.stdout:
            self.jsonl.close()
        elif self.jsonl is sys.stdout:
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                pass


def render_view(engine, source, sinks: EventSinks, elapsed_s: float):
    """The terminal view: activity bars, recent events, input level, latency, drops."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    bars = Table.grid(padding=(0, 1))
    on = engine.decoder.on  # the thresholds in force: the checkpoint's with --threshold overrides
    for label, p, thr in zip(engine.labels, engine.latest_probs, on):
        width = int(round(float(p) * 30))
        style = "bold green" if p >= thr else "dim"
        bars.add_row(f"{label:>20}", f"[{style}]{'█' * width}{'·' * (30 - width)}[/]", f"{p:4.2f}")
    stats = source.stats
    compute = engine.stats.compute_ms_per_hop()
    status = (f"t {elapsed_s:7.1f} s   input {stats.level_dbfs:6.1f} dBFS ({stats.device_name})   "
              f"latency {engine.algorithmic_latency_s * 1000:.0f} ms + compute {compute:.2f} ms/hop "
              f"(RTF {compute / (engine.hop_s * 1000):.3f})   dropped blocks {stats.dropped_blocks}  "
              f"overflows {stats.overflows}  non-finite fixed {stats.nonfinite_replaced}  "
              f"clipped {stats.clipped_samples}")
    if stats.silence_s > 10:
        status += f"\n[yellow]input silent for {stats.silence_s:.0f} s: is the microphone muted?[/]"
    recent = "\n".join(sinks.recent) or "(no events yet)"
    return Panel(Group(bars, "", recent, "", status), title=f"rtsed live: {engine.config.model.name}")


def open_source(args, rate_hz: int):
    from rtsed.audio import sources

    if args.input:
        from rtsed.audio.network import UrlSource, is_url

        if is_url(args.input):
            return UrlSource(args.input, rate_hz, reconnect=not args.no_reconnect)
        return sources.FileSource(args.input, rate_hz, realtime=args.realtime)
    device = args.input_device
    if device is not None and device.isdigit():
        device = int(device)
    return sources.MicrophoneSource(rate_hz, device=device)


def run(args: argparse.Namespace) -> int:
    from rtsed.models.bundled import resolve_model
    from rtsed.serve.engine import DetectionEngine, make_stepper

    model_path = resolve_model(args.model)
    stepper, config, _ = make_stepper(model_path, args.backend, args.device, threads=args.threads,
                                      precision=args.precision)
    overrides = parse_thresholds(args.threshold)
    source = open_source(args, config.frontend.sample_rate_hz)
    engine = DetectionEngine(stepper, config, frames_per_step=args.frames_per_step, decoder_overrides=overrides,
                             extra_latency_s=source.delay_s)
    name = Path(args.input).name if args.input else "live"
    sinks = EventSinks(args.jsonl, args.tsv, args.audacity, name)
    interactive = not args.no_view and sys.stderr.isatty()
    stop = {"now": False}

    def on_stop_signal(signum, frame):
        # Ctrl-C / SIGTERM ask the loop to stop after the block in hand: a KeyboardInterrupt
        # raised mid-block could land between the model step and the decoder (frames replayed
        # at flush) or between emitting a block's events (finished events lost). A second
        # Ctrl-C interrupts at once.
        if stop["now"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["now"] = True

    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():  # signal.signal works only there
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous_handlers[sig] = signal.signal(sig, on_stop_signal)
    precision = "" if args.precision == "fp32" else f" ({args.precision} GEMMs)"
    graph = getattr(getattr(stepper, "stream", None), "file", None)  # an ONNX step graph's OnnxFile
    if graph is not None and graph.precision == "int8":
        from rtsed.backends.precision import cpu_int8_dot

        dot = cpu_int8_dot()
        precision = f" (int8 graph, {dot} kernels)" if dot else " (int8 graph, no VNNI: slower integer kernels)"
    print(f"rtsed live: {config.model.name} ({model_path}), backend {args.backend}{precision} on {args.device}, "
          f"{len(config.labels)} classes; algorithmic latency {engine.algorithmic_latency_s * 1000:.0f} ms "
          f"(lookahead {engine.lookahead_frames} frames, smoother {max(engine.decoder.delay_frames)} frames)", file=sys.stderr)
    started = time.monotonic()
    view = None
    try:
        with source:
            if interactive:
                from rich.console import Console
                from rich.live import Live

                view = Live(console=Console(stderr=True), refresh_per_second=8, transient=False)
                view.start()
            while not stop["now"]:
                block = source.read(timeout_s=0.5)
                if block is None:
                    break
                for item in engine.push_audio(block):
                    sinks.emit(item)
                elapsed = time.monotonic() - started
                if view is not None:
                    view.update(render_view(engine, source, sinks, elapsed))
                if args.duration and elapsed >= args.duration:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        for item in engine.flush():
            sinks.emit(item)
        if view is not None:
            view.update(render_view(engine, source, sinks, time.monotonic() - started))
            view.stop()
        sinks.close()
        summary = (f"{len(sinks.events)} events; compute {engine.stats.compute_ms_per_hop():.3f} ms per "
                   f"{engine.hop_s * 1000:.0f} ms hop; " + _source_summary(source))
        print(summary, file=sys.stderr)
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return 0


def _source_summary(source) -> str:
    stats = source.stats
    return (f"dropped blocks {stats.dropped_blocks}, overflows {stats.overflows}, "
            f"non-finite samples replaced {stats.nonfinite_replaced}, clipped samples {stats.clipped_samples}"
            + (f"; stream ended: {stats.end_reason}" if stats.end_reason else ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rtsed.live", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint (.pt), exported step graph (.onnx) or bundled detector name")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", metavar="FILE|URL",
                     help="stream a file, or pull a URL (rtsp://, http://, any FFmpeg input; reconnects until "
                          "Ctrl-C), instead of a microphone")
    src.add_argument("--input-device", metavar="N|NAME", help="input device index or name (default: system default)")
    p.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    p.add_argument("--realtime", action="store_true", help="with --input FILE: pace the file at real time")
    p.add_argument("--no-reconnect", action="store_true",
                   help="with --input URL: end when the stream ends or drops instead of reconnecting")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="compute device")
    p.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16: the torch backend's GEMMs in bf16 on a CPU with AVX512_BF16/AMX (faster, "
                        "probabilities within ~1e-2 of fp32)")
    p.add_argument("--threads", type=int, default=1, help="compute threads (default 1: one stream)")
    p.add_argument("--frames-per-step", type=int, default=4, help="hops per model call (latency vs cost)")
    p.add_argument("--threshold", action="append", default=[], metavar="LABEL=ON[:OFF]",
                   help="override a class's decoder thresholds")
    p.add_argument("--jsonl", metavar="PATH|-", help="write onset/event lines as JSON (- for stdout)")
    p.add_argument("--tsv", metavar="PATH", help="DCASE TSV of the events, written at exit")
    p.add_argument("--audacity", metavar="PATH", help="Audacity label file of the events, written at exit")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--no-view", action="store_true", help="no terminal view")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and not args.list_devices:
        # As a command: each step allocates ~1.4 MB (f_dil's patches), which glibc serves with
        # fresh page faults every time; a caching allocator keeps them (rtsed.backends.allocator).
        from rtsed.backends.allocator import ensure_caching_allocator

        ensure_caching_allocator()
    from rtsed.models.bundled import ModelNotFoundError
    from rtsed.models.checkpoint import CheckpointError

    try:
        if args.list_devices:
            from rtsed.audio.sources import format_device_list

            print(format_device_list())
            return 0
        if not args.model:
            raise SystemExit("rtsed.live: --model is required (a checkpoint path or a bundled detector name)")
        return run(args)
    except (ModelNotFoundError, CheckpointError) as exc:
        print(f"rtsed.live: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError, OSError, ImportError) as exc:
        print(f"rtsed.live: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
