"""``python -m rtsed.detect FILE|DIR --model X.pt``: offline detection over files.

    python -m rtsed.detect scene.wav --model dnd_7_10.pt                    DCASE TSV on stdout
    python -m rtsed.detect recordings/ --model dnd_7_10.pt --output events.tsv
    python -m rtsed.detect scene.wav --model dnd_7_10.pt --format json --output events.json
    python -m rtsed.detect scene.wav --model dnd_7_10.pt --plot scene.png --reference scene.tsv

Each file runs through the same engine and decoder as ``rtsed.live`` (front end, model state,
hysteresis decoder), fed in large steps: streaming equals offline (tested), so this is exact, and
memory stays bounded however long the file. ``filename`` is relative to DIR (the base name for a
single FILE).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from rtsed.serve.decode import SoundEvent, write_dcase_tsv
from rtsed.backends.precision import PRECISIONS

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".aifc", ".au", ".mp3", ".opus"}
STEP_FRAMES = 256  # frames per model call offline: large steps amortise per-call overhead


def find_audio(target: Path) -> tuple[Path, list[Path]]:
    """(base folder, audio files) for a FILE or a DIR (searched recursively, sorted)."""
    if target.is_file():
        return target.parent, [target]
    if target.is_dir():
        files = sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            raise SystemExit(f"rtsed.detect: {target} holds no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})")
        return target, files
    raise SystemExit(f"rtsed.detect: {target}: no such file or folder")


def detect_file(path: Path, stepper, config, overrides=None, keep=False):
    """Run one file through a fresh engine stream -> (events, engine)."""
    from rtsed.audio.files import read_audio
    from rtsed.serve.engine import DetectionEngine

    stepper.reset()
    engine = DetectionEngine(stepper, config, frames_per_step=STEP_FRAMES, decoder_overrides=overrides,
                             keep_probabilities=keep)
    samples = read_audio(path, config.frontend.sample_rate_hz)
    block = config.frontend.hop_samples * STEP_FRAMES
    items = []
    for start in range(0, samples.shape[0], block):
        items += engine.push_audio(samples[start:start + block])
    items += engine.flush()
    events = sorted((e for e in items if isinstance(e, SoundEvent)), key=lambda e: (e.onset_s, e.label))
    return events, engine


def plot_detection(out: Path, engine, events: list[SoundEvent], title: str,
                   reference: list[tuple[float, float, str]] | None = None) -> None:
    """Log-mel, class probabilities and detected (and reference) events on one time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hop = engine.hop_s
    labels = list(engine.labels)
    logmel, probs = engine.logmel_frames(), engine.probabilities()
    t_end = max(logmel.shape[0], probs.shape[0]) * hop
    rows = 3 if reference is not None else 2
    fig, axes = plt.subplots(rows + 1, 1, figsize=(12, 2.2 + 2.2 * rows + 0.18 * len(labels)), sharex=True,
                             gridspec_kw={"height_ratios": [1.2, 1.5] + [1.0] * (rows - 1)})
    axes[0].imshow(logmel.T, origin="lower", aspect="auto", extent=(0, logmel.shape[0] * hop, 0, logmel.shape[1]),
                   cmap="magma")
    axes[0].set_ylabel("mel band")
    axes[0].set_title(title)
    axes[1].imshow(probs.T, origin="lower", aspect="auto", vmin=0, vmax=1,
                   extent=(0, probs.shape[0] * hop, -0.5, len(labels) - 0.5), cmap="viridis", interpolation="nearest")
    axes[1].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[1].set_ylabel("probability")

    def draw(ax, evs, colour, name):
        for onset, offset, label in evs:
            if label in labels:
                ax.broken_barh([(onset, offset - onset)], (labels.index(label) - 0.4, 0.8), color=colour)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylim(-0.6, len(labels) - 0.4)
        ax.set_ylabel(name)

    draw(axes[2], [(e.onset_s, e.offset_s, e.label) for e in events], "tab:orange", "detected")
    if reference is not None:
        draw(axes[3], reference, "tab:blue", "reference")
    axes[-1].set_xlim(0, t_end)
    axes[-1].set_xlabel("time (s)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def read_reference(tsv: Path, filename: str) -> list[tuple[float, float, str]]:
    """Reference events of one file from a DCASE TSV (matched by name or base name)."""
    import csv

    out = []
    with open(tsv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            name = row.get("filename") or ""
            if (name == filename or Path(name).name == Path(filename).name) and row.get("event_label"):
                out.append((float(row["onset"]), float(row["offset"]), row["event_label"]))
    return out


def main(argv: list[str] | None = None) -> int:
    from rtsed.models.bundled import ModelNotFoundError, resolve_model
    from rtsed.models.checkpoint import CheckpointError
    from rtsed.serve.engine import make_stepper
    from rtsed.cli.live import parse_thresholds

    p = argparse.ArgumentParser(prog="python -m rtsed.detect", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="an audio file or a folder of them")
    p.add_argument("--model", required=True, help="checkpoint (.pt), step graph (.onnx) or bundled name")
    p.add_argument("--output", help="output file (default: stdout)")
    p.add_argument("--format", default="tsv", choices=("tsv", "json"))
    p.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16: the torch backend's GEMMs in bf16 on a CPU with AVX512_BF16/AMX (faster, "
                        "probabilities within ~1e-2 of fp32)")
    p.add_argument("--threshold", action="append", default=[], metavar="LABEL=ON[:OFF]")
    p.add_argument("--plot", metavar="PNG", help="plot log-mel, probabilities and events (one file, or one PNG per file)")
    p.add_argument("--reference", metavar="TSV", help="reference events to draw in the plot")
    args = p.parse_args(argv)
    if argv is None:  # as a command: whole-file forwards allocate big tensors (rtsed.backends.allocator)
        from rtsed.backends.allocator import ensure_caching_allocator

        ensure_caching_allocator()
    try:
        base, files = find_audio(Path(args.target))
        stepper, config, _ = make_stepper(resolve_model(args.model), args.backend, args.device,
                                          precision=args.precision)
        overrides = parse_thresholds(args.threshold)
        from rich.progress import Progress

        rows: list[tuple[str, SoundEvent]] = []
        with Progress(transient=True, disable=len(files) < 2) as bar:
            task = bar.add_task("detecting", total=len(files))
            for path in files:
                name = str(path.relative_to(base)) if len(files) > 1 else path.name
                events, engine = detect_file(path, stepper, config, overrides, keep=bool(args.plot))
                rows += [(name, e) for e in events]
                if args.plot:
                    out = Path(args.plot) if len(files) == 1 else Path(args.plot).with_name(
                        f"{Path(args.plot).stem}_{Path(name).with_suffix('').as_posix().replace('/', '_')}.png")
                    ref = read_reference(Path(args.reference), name) if args.reference else None
                    plot_detection(out, engine, events, f"{name}: {config.model.name}", ref)
                bar.advance(task)
    except (ModelNotFoundError, CheckpointError, ValueError, OSError, RuntimeError) as exc:
        print(f"rtsed.detect: {exc}", file=sys.stderr)
        return 2
    target = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
    try:
        if args.format == "tsv":
            write_dcase_tsv(target, rows)
        else:
            json.dump({"model": config.model.name, "labels": list(config.labels),
                       "events": [{"filename": n, **e.to_dict()} for n, e in rows]}, target, indent=1)
            target.write("\n")
    finally:
        if target is not sys.stdout:
            target.close()
    print(f"{len(rows)} events in {len(files)} file(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
