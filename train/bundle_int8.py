"""``python -m train.bundle_int8``: ship a bundled detector's int8 streaming graph beside it.

    python -m train.bundle_int8 --name dnd_7_10 --calibration runs/scenes12_train/train \\
        --command "python -m train.synth ... --scenes 8 0 0 --out runs/scenes12_train" \\
        [--accuracy int8_accuracy.json]
    python -m train.bundle_int8 --name dnd_7_10 --graph DIR/dnd_7_10_int8.onnx --accuracy int8_accuracy.json

Exports ``rtsed/models/<name>.pt`` as ``rtsed/models/<name>_int8.onnx`` (``rtsed.export --streaming
--quantize int8 --calibration DIR``: static QDQ int8, carried state and logits fp32; the file's
metadata records the calibration and its content hash is checked on every load), and writes the
section "int8 graph" of the model card ``<name>.md``: how to run it, what it was calibrated on
(files, frames, steps, the SHA-256 of the files), the commands that made the calibration audio,
and, given ``--accuracy`` (``python -m benchmarks.int8_accuracy --json``), int8 against fp32 on
the test scenes. Calibrate on the detector's training side (its training scenes), never on the
scenes it is tested on. ``python -m train.bundle --int8-calibration DIR`` does the same when it
bundles a detector.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from rtsed.models.bundled import BUNDLED_DIR
from rtsed.models.checkpoint import load_checkpoint

SECTION = "## int8 graph"


def int8_section(name: str, graph: Path, commands: list[str], accuracy: dict | None = None) -> str:
    """The model card's int8 section for the graph at ``graph`` (its calibration from the metadata)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(graph)).metadata_props}
    cal = json.loads(meta["rtsed_calibration"])
    folder = f"{Path(cal['folder']).parent.name}/{Path(cal['folder']).name}"
    lines = [SECTION, "",
             f"`{graph.name}` beside this card is the streaming step graph quantized to int8 (onnxruntime static "
             "QDQ, signed int8 activations and per-channel weights; the carried state and the logits stay fp32). "
             f"Use: `python -m rtsed.live --model {graph.name} --backend onnx` (also `rtsed.detect` and the "
             "engines). It is for CPUs with VNNI (`python -m rtsed.doctor` says whether this one has it).", "",
             f"Calibrated on the training side, never on test scenes: {len(cal['files'])} files of "
             f"`{folder}` ({cal['frames']} frames, "
             f"{cal['steps']} recorded steps, {cal['method']}); SHA-256 of their names and bytes "
             f"`{cal['sha256']}`.", ""]
    if commands:
        lines += ["```", *commands, f"python -m train.bundle_int8 --name {name} --calibration .../{folder}", "```", ""]
    if accuracy:
        f, q = accuracy["scores"]["fp32"], accuracy["scores"]["int8"]
        points = list(f["frame_f1"])
        lines += [f"On the test scenes (`{Path(accuracy['data']).name}`, split {accuracy['split']}, {accuracy['frames']} "
                  "frames; `python -m benchmarks.int8_accuracy`), fp32 / int8:", "",
                  "| " + " | ".join([*(f"frame F1, {p}" for p in points), "event F1 (decoder)", "PSDS1",
                                     "max abs prob. deviation", "mean abs prob. deviation"]) + " |",
                  "|" + "---|" * (len(points) + 4),
                  "| " + " | ".join([*(f"{f['frame_f1'][p]:.3f} / {q['frame_f1'][p]:.3f}" for p in points),
                                     f"{f['event_f1_live_decoder']:.3f} / {q['event_f1_live_decoder']:.3f}",
                                     f"{f['psds1']:.3f} / {q['psds1']:.3f}", f"{accuracy['prob_max_abs_dev']:.4f}",
                                     f"{accuracy['prob_mean_abs_dev']:.5f}"]) + " |", ""]
    return "\n".join(lines)


def with_section(card: str, section: str) -> str:
    """``card`` with its int8 section replaced by ``section`` (or, where it has none, added
    before the closing "Written by" line)."""
    card = re.sub(rf"{re.escape(SECTION)}\n.*?(?=^## |^Written by |\Z)", "", card, flags=re.S | re.M)
    match = re.search(r"^Written by ", card, flags=re.M)
    if match is None:
        return card.rstrip("\n") + "\n\n" + section + "\n"
    return card[:match.start()] + section + "\n" + card[match.start():]


def ship(name: str, calibration: str | Path | None, commands: list[str] = (), accuracy: dict | None = None,
         steps: int = 512, bundled_dir: Path | None = None, graph: str | Path | None = None) -> Path:
    """Export ``<name>.pt``'s int8 step graph beside it (or, given ``graph``, copy that one, made
    from the same checkpoint, e.g. by ``benchmarks.int8_accuracy --out-dir``) and write its card
    section; the shipped graph's path."""
    import shutil

    from rtsed.stream.onnx_quantize import export_int8
    from rtsed.stream.onnx_runtime import OnnxFile

    folder = Path(bundled_dir or BUNDLED_DIR)
    ckpt = load_checkpoint(folder / f"{name}.pt", "cpu")
    target = folder / f"{name}_int8.onnx"
    if graph is None:
        graph = export_int8(ckpt.model, ckpt.config, target, calibration, streaming=True, max_steps=steps)
    else:
        made = OnnxFile.open(graph)
        if made.precision != "int8" or made.graph != "step" or made.config != ckpt.config:
            raise SystemExit(f"--graph {graph}: not an int8 step graph of {name}.pt (export it with "
                             "rtsed.export --streaming --quantize int8)")
        shutil.copyfile(graph, target)
        graph = target
    card = folder / f"{name}.md"
    card.write_text(with_section(card.read_text(), int8_section(name, graph, list(commands), accuracy)))
    return graph


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.bundle_int8", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="a bundled detector, e.g. dnd_7_10")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--calibration", metavar="DIR", help="audio of the detector's training side")
    source.add_argument("--graph", help="ship this int8 step graph of the detector, already exported (its "
                                        "calibration is in its metadata)")
    p.add_argument("--command", action="append", default=[], help="a command that made the calibration audio")
    p.add_argument("--accuracy", metavar="JSON", help="python -m benchmarks.int8_accuracy --json output")
    p.add_argument("--calibration-steps", type=int, default=512, metavar="N")
    args = p.parse_args(argv)
    accuracy = None
    if args.accuracy:
        results = json.loads(Path(args.accuracy).read_text())
        results = results if isinstance(results, list) else [results]
        matching = [r for r in results if Path(r["model"]).name.removesuffix(".pt") == args.name]
        if not matching:
            p.error(f"--accuracy {args.accuracy} has no result for {args.name}")
        accuracy = matching[0]
    graph = ship(args.name, args.calibration, args.command, accuracy, args.calibration_steps, graph=args.graph)
    print(f"wrote {graph} ({graph.stat().st_size / 1e6:.2f} MB) and the int8 section of {args.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
