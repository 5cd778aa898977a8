"""``python -m rtsed.detect FILE|DIR --model X.pt``: offline detection over files.

    python -m rtsed.detect scene.wav --model dnd_7_10.pt                    DCASE TSV on stdout
    python -m rtsed.detect recordings/ --model dnd_7_10.pt --output events.tsv
    python -m rtsed.detect scene.wav --model dnd_7_10.pt --format json --output events.json
    python -m rtsed.detect scene.wav --model dnd_7_10.pt --plot scene.png --reference scene.tsv

Each file runs through the same engine and decoder as ``rtsed.live`` (front end, model state,
hysteresis decoder), fed in large steps: streaming equals offline (tested), so this is exact. The
file is read, downmixed and resampled block by block (rtsed.audio.files.AudioFileReader), so
memory stays bounded however long the file (``--plot`` keeps each file's frames for its plot).
``filename`` is relative to DIR (the base name for a single FILE).

Nothing computed is lost: a file that fails is listed on stderr with the reason and the others'
events are still written; ``--output`` is checked before any compute and written atomically
(temporary file + rename), so it is either the complete result or left as it was.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np

from rtsed.atomic import OutputError, check_writable, write_atomically
from rtsed.audio.files import AUDIO_SUFFIXES, AudioFileError, AudioFileReader, audio_files_under
from rtsed.serve.decode import SoundEvent, write_dcase_tsv
from rtsed.backends.precision import PRECISIONS

STEP_FRAMES = 256  # frames per model call offline: large steps amortise per-call overhead

# Exit codes (also in --help).
EXIT_OK, EXIT_FILES_FAILED, EXIT_NOTHING_RUN, EXIT_OUTPUT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = """exit codes:
  0    every file detected, output written
  1    some files failed (each listed on stderr with the reason); the other files' events were written
  2    nothing was run: bad arguments, model, input path, or an --output/--plot path that cannot be
       written (checked before any compute)
  3    detection finished but --output could not be written (e.g. the disk filled up): the file was
       left as it was (never half written) and the events went to stdout instead
  130  interrupted (Ctrl-C): the events of the files finished so far were written
"""


def find_audio(target: Path) -> tuple[Path, list[Path]]:
    """(base folder, audio files) for a FILE or a DIR (searched recursively, sorted); AudioFileError
    for a missing target or a folder without audio."""
    if target.is_file():
        return target.parent, [target]
    if target.is_dir():
        files = audio_files_under(target)
        if not files:
            raise AudioFileError(f"{target} holds no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})")
        return target, files
    raise AudioFileError(f"{target}: not found (no such file or folder)")


def exact_blocks(blocks: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The concatenation of ``blocks`` re-cut into blocks of exactly ``size`` samples (the last
    may be shorter): the engine then steps at the same samples however the file was read."""
    held: list[np.ndarray] = []
    n = 0
    for block in blocks:
        if not len(block):
            continue
        held.append(block)
        n += len(block)
        if n >= size:
            joined = np.concatenate(held)
            whole = n - n % size
            for start in range(0, whole, size):
                yield joined[start:start + size]
            held, n = ([joined[whole:]], n - whole) if n > whole else ([], 0)
    if n:
        yield np.concatenate(held)


def detect_file(path: Path, stepper, config, overrides=None, keep=False, warnings: list[str] | None = None):
    """Run one file through a fresh engine stream -> (events, engine), reading it block by block.
    One-line warnings about the input (truncated, below the model's rate, clipped) are appended to
    ``warnings``. AudioFileError for a file that cannot be used."""
    rate = config.frontend.sample_rate_hz
    with AudioFileReader(path, rate) as reader:
        events, engine = detect_blocks(reader, stepper, config, overrides, keep)
    if warnings is not None:
        warnings += reader.notes.warnings(rate)
    return events, engine


def detect_blocks(blocks: Iterable[np.ndarray], stepper, config, overrides=None, keep=False):
    """One stream of mono float32 blocks at the model's rate, in any sizes, through a fresh
    engine stream -> (events sorted by onset then label, engine): what ``rtsed.detect`` reports
    for a file holding those samples (the engine steps at the same samples however they are cut)."""
    from rtsed.serve.engine import DetectionEngine

    stepper.reset()
    engine = DetectionEngine(stepper, config, frames_per_step=STEP_FRAMES, decoder_overrides=overrides,
                             keep_probabilities=keep)
    items = []
    for block in exact_blocks(blocks, config.frontend.hop_samples * STEP_FRAMES):
        items += engine.push_audio(block)
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
    try:
        write_atomically(out, lambda f: fig.savefig(f, dpi=110, format="png"), binary=True, what="--plot")
    finally:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rtsed.detect", description=__doc__.split("\n\n")[0],
                                epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="an audio file or a folder of them")
    p.add_argument("--model", required=True, help="checkpoint (.pt), step graph (.onnx) or bundled name")
    p.add_argument("--output", help="output file (default: stdout); its folder must exist")
    p.add_argument("--format", default="tsv", choices=("tsv", "json"))
    p.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16: the torch backend's GEMMs in bf16 on a CPU with AVX512_BF16/AMX (faster, "
                        "probabilities within ~1e-2 of fp32)")
    p.add_argument("--threshold", action="append", default=[], metavar="LABEL=ON[:OFF]")
    p.add_argument("--plot", metavar="PNG", help="plot log-mel, probabilities and events (one file, or one PNG per file)")
    p.add_argument("--reference", metavar="TSV", help="reference events to draw in the plot")
    return p


def _plot_path(plot: str, name: str, single: bool) -> Path:
    if single:
        return Path(plot)
    return Path(plot).with_name(f"{Path(plot).stem}_{Path(name).with_suffix('').as_posix().replace('/', '_')}.png")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    from rtsed.models.bundled import ModelNotFoundError, resolve_model
    from rtsed.models.checkpoint import CheckpointError
    from rtsed.serve.engine import make_stepper
    from rtsed.cli.live import parse_thresholds

    args = build_parser().parse_args(argv)
    if argv is None:  # as a command: whole-file forwards allocate big tensors (rtsed.backends.allocator)
        from rtsed.backends.allocator import ensure_caching_allocator

        ensure_caching_allocator()
    try:
        base, files = find_audio(Path(args.target))
        # Every path this run will write is checked before any compute: a typo in --output must
        # not cost the whole folder's detection.
        if args.output:
            check_writable(args.output, "--output")
        if args.plot:
            check_writable(args.plot, "--plot")
        if args.reference and not Path(args.reference).is_file():
            raise AudioFileError(f"--reference {args.reference}: not found")
        stepper, config, _ = make_stepper(resolve_model(args.model), args.backend, args.device,
                                          precision=args.precision)
        overrides = parse_thresholds(args.threshold)
    except (ModelNotFoundError, CheckpointError, ValueError, OSError, RuntimeError) as exc:
        print(f"rtsed.detect: {exc}", file=sys.stderr)
        return EXIT_NOTHING_RUN
    from rich.progress import Progress

    rows: list[tuple[str, SoundEvent]] = []
    failed: list[tuple[str, str]] = []
    done = 0
    interrupted = False
    with Progress(transient=True, disable=len(files) < 2) as bar:
        task = bar.add_task("detecting", total=len(files))
        for path in files:
            name = str(path.relative_to(base)) if len(files) > 1 else path.name
            notes: list[str] = []
            try:
                events, engine = detect_file(path, stepper, config, overrides, keep=bool(args.plot), warnings=notes)
            except KeyboardInterrupt:
                interrupted = True
                break
            except (AudioFileError, OSError, ValueError, RuntimeError, MemoryError) as exc:
                failed.append((name, _one_line(exc)))
                bar.advance(task)
                continue
            done += 1
            rows += [(name, e) for e in events]
            for line in notes:
                print(f"rtsed.detect: warning: {line}", file=sys.stderr)
            if args.plot:
                try:
                    ref = read_reference(Path(args.reference), name) if args.reference else None
                    plot_detection(_plot_path(args.plot, name, len(files) == 1), engine, events,
                                   f"{name}: {config.model.name}", ref)
                except (OSError, ValueError) as exc:  # the events stay in the output
                    failed.append((name, f"plot not written: {_one_line(exc)}"))
            bar.advance(task)

    def emit(target: IO) -> None:
        if args.format == "tsv":
            write_dcase_tsv(target, rows)
        else:
            json.dump({"model": config.model.name, "labels": list(config.labels),
                       "events": [{"filename": n, **e.to_dict()} for n, e in rows],
                       "failed": [{"filename": n, "error": why} for n, why in failed]}, target, indent=1)
            target.write("\n")

    code = EXIT_INTERRUPTED if interrupted else EXIT_FILES_FAILED if failed else EXIT_OK
    if done == 0 and args.output:
        print(f"rtsed.detect: no file was detected, so {args.output} was not written", file=sys.stderr)
    elif args.output:
        try:
            write_atomically(args.output, emit, what="--output")
        except OutputError as exc:
            print(f"rtsed.detect: {exc}\nrtsed.detect: the {len(rows)} events follow on stdout so that they are "
                  "not lost", file=sys.stderr)
            emit(sys.stdout)
            code = EXIT_OUTPUT_FAILED
    else:
        emit(sys.stdout)
    if failed:
        print(f"rtsed.detect: {len({n for n, _ in failed})} of {len(files)} file(s) failed:", file=sys.stderr)
        for n, why in failed:
            print(f"  {n}: {why}", file=sys.stderr)
    if interrupted:
        print(f"rtsed.detect: interrupted after {done} of {len(files)} file(s); their events were written",
              file=sys.stderr)
    print(f"{len(rows)} events in {done} file(s)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
