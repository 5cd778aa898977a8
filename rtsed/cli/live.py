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

No audio for ``--watchdog-s`` seconds (a frozen audio server, an unplugged device) is reported in
the view and on stderr. Stop, Ctrl-C, SIGTERM and ``--duration`` end the session within about a
second whatever the device does: the device is closed on a thread of its own while the outputs
are written, and one that does not close within DEVICE_CLOSE_TIMEOUT_S is left behind (said so,
exit code 1). Listing and opening the device wait at most ``--open-timeout-s`` for the audio
system (an audio server frozen before the session starts blocks PortAudio's initialisation);
then the session ends with exit code 1, naming the frozen server.

``--jsonl`` starts each session with a ``{"type": "session", ...}`` line (start time, model,
compute device, input and rates, labels): sessions appended to one file stay separable.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from rtsed.audio.sources import DEVICE_OPEN_TIMEOUT_S, AudioDeviceTimeout
from rtsed.audio.watchdog import InputWatchdog
from rtsed.backends.precision import PRECISIONS
from rtsed.cli.live_sinks import EventSinks

__all__ = ["EventSinks", "build_parser", "main", "parse_thresholds", "render_view", "run"]

# Exit codes (also in --help).
EXIT_OK, EXIT_INPUT_FAILED, EXIT_NOT_RUN, EXIT_OUTPUT_FAILED = 0, 1, 2, 3
# How long the end of a session waits for the audio device to close. The outputs are written
# meanwhile; a device still closing after this (a frozen audio server) is left behind.
DEVICE_CLOSE_TIMEOUT_S = 1.0


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


def render_view(engine, source, sinks: EventSinks, elapsed_s: float, watchdog: InputWatchdog | None = None):
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
    warning = watchdog.status() if watchdog is not None else None
    if warning:
        status += f"\n[bold red]{warning}[/]"
    elif stats.silence_s > 10:
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
    return sources.MicrophoneSource(rate_hz, device=device, open_timeout_s=args.open_timeout_s)


class Session:
    """The result of ``run``: the exit code, and whether the audio device was left closing (the
    process should then end with ``os._exit``: PortAudio's exit handler would block on it)."""

    def __init__(self, code: int, device_abandoned: bool):
        self.code, self.device_abandoned = code, device_abandoned


def run(args: argparse.Namespace) -> int:
    """The session; its exit code (see ``build_parser``'s epilog)."""
    return run_session(args).code


def run_session(args: argparse.Namespace) -> Session:
    from rtsed.models.bundled import resolve_model
    from rtsed.serve.engine import DetectionEngine, make_stepper

    EventSinks.check(args.jsonl, args.tsv, args.audacity)  # before any model or device is opened
    watchdog_s = args.watchdog_s
    if not watchdog_s > 0:
        raise SystemExit(f"rtsed.live: --watchdog-s must be > 0 seconds, got {watchdog_s}")
    model_path = resolve_model(args.model)
    stepper, config, _ = make_stepper(model_path, args.backend, args.device, threads=args.threads,
                                      precision=args.precision)
    overrides = parse_thresholds(args.threshold)
    source = open_source(args, config.frontend.sample_rate_hz)
    engine = DetectionEngine(stepper, config, frames_per_step=args.frames_per_step, decoder_overrides=overrides,
                             extra_latency_s=source.delay_s)
    name = Path(args.input).name if args.input else "live"
    interactive = not args.no_view and sys.stderr.isatty()
    view = None

    def report(message: str) -> None:
        """A problem, the moment it happens: above the view when there is one, else stderr."""
        if view is not None:
            view.console.print(f"[bold red]rtsed.live: {message}[/]")
        else:
            print(f"rtsed.live: {message}", file=sys.stderr, flush=True)

    sinks = EventSinks(args.jsonl, args.tsv, args.audacity, name, report=report)
    watchdog = InputWatchdog(watchdog_s, source.stats.device_name or name)
    stop = {"now": False, "finishing": False}

    def on_stop_signal(signum, frame):
        # Ctrl-C / SIGTERM ask the loop to stop after the block in hand: a KeyboardInterrupt
        # raised mid-block could land between the model step and the decoder (frames replayed
        # at flush) or between emitting a block's events (finished events lost). A second
        # Ctrl-C interrupts the loop at once; once the session is finishing (within a second,
        # writing the outputs) further signals are ignored so that the outputs get written.
        if stop["finishing"]:
            return
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
    stats = source.stats
    sinks.begin({"started_utc": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                 "model": config.model.name, "model_path": str(model_path), "backend": args.backend,
                 "device": args.device, "input": stats.device_name or name,
                 "input_rate_hz": stats.device_rate_hz, "sample_rate_hz": config.frontend.sample_rate_hz,
                 "labels": list(config.labels)})
    started = time.monotonic()
    try:
        source.start()
    except BaseException:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        raise
    try:
        if interactive:
            from rich.console import Console
            from rich.live import Live

            view = Live(console=Console(stderr=True), refresh_per_second=8, transient=False)
            view.start()
        while not stop["now"]:
            # Bounded wait: a device that delivers nothing (frozen server) leaves the loop free
            # to see the stop flag, the duration and the watchdog.
            block = source.read(timeout_s=0.25)
            if block is None:
                break
            for item in engine.push_audio(block):
                sinks.emit(item)
            alarm = watchdog.feed(source.stats.samples_in)
            if alarm:
                report(alarm)
            sinks.tick()
            elapsed = time.monotonic() - started
            if view is not None:
                view.update(render_view(engine, source, sinks, elapsed, watchdog))
            if args.duration and elapsed >= args.duration:
                break
    except KeyboardInterrupt:
        pass
    finally:
        stop["finishing"] = True
        closing_started = time.monotonic()
        device_closed = source.stop_async()  # off the critical path: it may never return
        for item in engine.flush():
            sinks.emit(item)
        if view is not None:
            view.update(render_view(engine, source, sinks, time.monotonic() - started, watchdog))
            view.stop()
            view = None
        outputs_ok = sinks.close()
        closed = device_closed.wait(max(0.0, closing_started + DEVICE_CLOSE_TIMEOUT_S - time.monotonic()))
        if not closed:
            report(f"the audio device did not close within {DEVICE_CLOSE_TIMEOUT_S:g} s (a frozen or hung audio "
                   "server?); exiting without it. Every output was written before.")
        stats = source.stats
        summary = (f"{len(sinks.events)} events; compute {engine.stats.compute_ms_per_hop():.3f} ms per "
                   f"{engine.hop_s * 1000:.0f} ms hop; " + _source_summary(stats)
                   + (f"; audio stalled {watchdog.stalls} time(s)" if watchdog.stalls else ""))
        print(summary, file=sys.stderr, flush=True)
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if not outputs_ok:
        code = EXIT_OUTPUT_FAILED
    elif stats.failure or not closed:
        if stats.failure:
            report(f"the audio input failed: {stats.failure}")
        code = EXIT_INPUT_FAILED
    else:
        code = EXIT_OK
    return Session(code, device_abandoned=not closed)


def _source_summary(stats) -> str:
    return (f"dropped blocks {stats.dropped_blocks}, overflows {stats.overflows}, "
            f"non-finite samples replaced {stats.nonfinite_replaced}, clipped samples {stats.clipped_samples}"
            + (f"; stream ended: {stats.end_reason}" if stats.end_reason else ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rtsed.live", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 the session ended (stop, Ctrl-C, SIGTERM, --duration, end of file); 1 the audio "
               "input failed (decoding error, device stopped, or did not open or close in time), every output "
               "still written; 2 "
               "nothing run (arguments, model, device, an output that cannot be written); 3 an output could "
               "not be written at the end (the others were)")
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
    p.add_argument("--tsv", metavar="PATH", help="DCASE TSV of the events, kept current (atomic rewrites) and "
                                                 "complete at exit")
    p.add_argument("--audacity", metavar="PATH", help="Audacity label file of the events, kept current and "
                                                      "complete at exit")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--watchdog-s", type=float, default=3.0, metavar="S",
                   help="report when no audio has arrived for this many seconds (default 3)")
    p.add_argument("--open-timeout-s", type=float, default=DEVICE_OPEN_TIMEOUT_S, metavar="S",
                   help="give up (exit 1) when the audio system does not list or open the input device within "
                        f"this many seconds, e.g. a frozen audio server (default {DEVICE_OPEN_TIMEOUT_S:g})")
    p.add_argument("--no-view", action="store_true", help="no terminal view")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.open_timeout_s > 0:
        raise SystemExit(f"rtsed.live: --open-timeout-s must be > 0 seconds, got {args.open_timeout_s}")
    if argv is None and not args.list_devices:
        # As a command: each step allocates ~1.4 MB (f_dil's patches), which glibc serves with
        # fresh page faults every time; a caching allocator keeps them (rtsed.backends.allocator).
        from rtsed.backends.allocator import ensure_caching_allocator

        ensure_caching_allocator()
    from rtsed.models.bundled import ModelNotFoundError
    from rtsed.models.checkpoint import CheckpointError

    try:
        if args.list_devices:
            from rtsed.audio.sources import format_device_list, list_input_devices

            print(format_device_list(list_input_devices(args.open_timeout_s)))
            return 0
        if not args.model:
            raise SystemExit("rtsed.live: --model is required (a checkpoint path or a bundled detector name)")
        session = run_session(args)
    except (ModelNotFoundError, CheckpointError) as exc:
        print(f"rtsed.live: {exc}", file=sys.stderr)
        return EXIT_NOT_RUN
    except AudioDeviceTimeout as exc:
        print(f"rtsed.live: {exc}", file=sys.stderr, flush=True)
        if argv is None:  # a thread is still blocked in PortAudio: see the end of this function
            os._exit(EXIT_INPUT_FAILED)
        return EXIT_INPUT_FAILED
    except (RuntimeError, ValueError, OSError, ImportError) as exc:
        print(f"rtsed.live: {exc}", file=sys.stderr)
        return EXIT_NOT_RUN
    if session.device_abandoned and argv is None:
        # As a command: a device thread is still blocked in PortAudio, and PortAudio's exit
        # handler (sounddevice's atexit) would block on the same device: leave at once, the
        # outputs are written and flushed.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                pass
        os._exit(session.code)
    return session.code


if __name__ == "__main__":
    sys.exit(main())
