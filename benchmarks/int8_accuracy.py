"""int8 against fp32 on a test split: the scores and the probabilities' deviation, in one command.

    python -m benchmarks.int8_accuracy --model dnd_7_10 dnd_7_10_causal --calibration TRAIN_SCENES \\
        --data TEST_SCENES --split test [--out-dir DIR] [--json FILE]
    python -m benchmarks.int8_accuracy --model dnd_7_10 --int8 dnd_7_10_int8.onnx --data TEST_SCENES

For each model: with ``--calibration`` its int8 step graph is exported first (``rtsed.export
--streaming --quantize int8 --calibration``, written to ``--out-dir``/<name>_int8.onnx), or
``--int8`` names one already made. Then the checkpoint's fp32 torch model (offline,
``train.evaluate``'s own inference) and the int8 step graph (streamed 16 frames per step, then
flushed, as rtsed.live runs it) are both scored with ``train.evaluate``: frame F1 at each
operating point, event F1 of the live decoder's events, PSDS1; and the int8 probabilities' max
and mean absolute deviation from fp32's over every frame and class. Prints one markdown table
row per model (benchmarks/README.md). Exit status 1 when int8 loses more than
``MAX_FRAME_F1_DROP`` frame F1 at any operating point: a defect (issue #20). Choose a remedy on
validation scenes (``--split validate``), never on the test split: the calibration's ranges
(``export_int8(..., method=, percentile=)``) or nodes kept fp32 (``exclude=``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from rtsed.models.bundled import resolve_model
from rtsed.models.checkpoint import load_checkpoint
from train.evaluate import _items_from_args, evaluate, predict

MAX_FRAME_F1_DROP = 0.01


def compare(model: str, int8: str, data: str, split: str = "test") -> dict:
    """Score ``model`` (fp32, torch) and its int8 step graph ``int8`` on ``data``'s ``split``."""
    ckpt = load_checkpoint(resolve_model(model), "cpu")
    items, name, split = _items_from_args(argparse.Namespace(data=data, test_data=None, split=split))
    outputs = {"fp32": predict(ckpt, items), "int8": predict(ckpt, items, onnx=int8)}
    dev = np.concatenate([np.abs(a.probs - b.probs).ravel() for a, b in zip(outputs["fp32"], outputs["int8"])])
    scores = {}
    for precision, onnx in (("fp32", None), ("int8", int8)):
        result = evaluate(ckpt, items, onnx=onnx, data=name, split=split, outputs=outputs[precision])
        points = {p["name"]: p for p in result["operating_points"]}
        scores[precision] = {
            "frame_f1": {k: p["frame"]["f1"] for k, p in points.items()},
            "event_f1_live_decoder": points["live decoder"]["event"]["f1"],
            "psds1": result["psds1"]["psds"],
        }
    drop = max(scores["fp32"]["frame_f1"][k] - scores["int8"]["frame_f1"][k] for k in scores["fp32"]["frame_f1"])
    return {"model": model, "int8": str(int8), "data": data, "split": split,
            "frames": int(dev.size // len(ckpt.config.labels)), "prob_max_abs_dev": float(dev.max()),
            "prob_mean_abs_dev": float(dev.mean()), "max_frame_f1_drop": float(drop), "scores": scores}


def export(model: str, calibration: str, out_dir: Path, steps: int) -> Path:
    """``model``'s int8 step graph, calibrated on the scenes under ``calibration``."""
    from rtsed.stream.onnx_quantize import export_int8

    ckpt = load_checkpoint(resolve_model(model), "cpu")
    out = out_dir / f"{Path(model).name.removesuffix('.pt')}_int8.onnx"
    return export_int8(ckpt.model, ckpt.config, out, calibration, streaming=True, max_steps=steps)


def row(result: dict) -> str:
    f, q = result["scores"]["fp32"], result["scores"]["int8"]
    cells = [result["model"]]
    for point in f["frame_f1"]:
        cells.append(f"{f['frame_f1'][point]:.3f} / {q['frame_f1'][point]:.3f}")
    cells += [f"{f['event_f1_live_decoder']:.3f} / {q['event_f1_live_decoder']:.3f}",
              f"{f['psds1']:.3f} / {q['psds1']:.3f}",
              f"{result['prob_max_abs_dev']:.4f}", f"{result['prob_mean_abs_dev']:.5f}"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, nargs="+", help="checkpoints or bundled detector names")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--calibration", metavar="DIR",
                        help="export each model's int8 step graph first, calibrated on the audio under DIR "
                             "(training-side scenes, never the test split)")
    source.add_argument("--int8", help="an int8 step graph already exported (one --model only)")
    p.add_argument("--calibration-steps", type=int, default=512, metavar="N",
                   help="step inputs recorded for calibration (rtsed.export's default: 512)")
    p.add_argument("--out-dir", help="where the exported int8 graphs go (default: a temporary folder)")
    p.add_argument("--data", required=True, help="a train.synth folder (or TUT-SED root) with the test scenes")
    p.add_argument("--split", default="test")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.int8 and len(args.model) != 1:
        p.error("--int8 names the graph of one --model; give --calibration DIR to export one per model")
    results = []
    with tempfile.TemporaryDirectory(prefix="rtsed-int8-") as tmp:
        out_dir = Path(args.out_dir or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for model in args.model:
            int8 = args.int8 or export(model, args.calibration, out_dir, args.calibration_steps)
            results.append(compare(model, str(int8), args.data, args.split))
            print(json.dumps(results[-1], indent=1), flush=True)
    print("frame F1 columns (fp32 / int8):", ", ".join(results[0]["scores"]["fp32"]["frame_f1"]))
    for result in results:
        print(row(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    worse = [r for r in results if r["max_frame_f1_drop"] > MAX_FRAME_F1_DROP]
    for r in worse:
        print(f"{r['model']}: int8 loses {r['max_frame_f1_drop']:.3f} frame F1 (more than {MAX_FRAME_F1_DROP}): "
              "choose its calibration or fp32 nodes on validation scenes", file=sys.stderr)
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
