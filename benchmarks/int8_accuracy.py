"""int8 against fp32 on a test split: the scores and the probabilities' deviation.

    python -m benchmarks.int8_accuracy --model dnd_7_10 --int8 dnd_7_10_int8.onnx --data esc10_scenes --split test

Scores both the checkpoint's fp32 torch model (offline, ``train.evaluate``'s own inference) and the
int8 step graph (streamed 16 frames per step, then flushed, as rtsed.live runs it) with
``train.evaluate``: frame F1 at each operating point, event F1 of the live decoder's events,
PSDS1; then the int8 probabilities' max and mean absolute deviation from fp32's over every
frame and class. Prints one markdown table row per model (benchmarks/README.md) and, with
``--json``, writes everything.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from rtsed.models.bundled import resolve_model
from rtsed.models.checkpoint import load_checkpoint
from train.evaluate import _items_from_args, evaluate, predict


def compare(model: str, int8: str, data: str, split: str = "test") -> dict:
    ckpt = load_checkpoint(resolve_model(model), "cpu")
    items, name, split = _items_from_args(argparse.Namespace(data=data, test_data=None, split=split))
    fp32_probs = predict(ckpt, items)
    int8_probs = predict(ckpt, items, onnx=int8)
    dev = np.concatenate([np.abs(a.probs - b.probs).ravel() for a, b in zip(fp32_probs, int8_probs)])
    scores = {}
    for precision, onnx in (("fp32", None), ("int8", int8)):
        result = evaluate(ckpt, items, onnx=onnx, data=name, split=split)
        points = {p["name"]: p for p in result["operating_points"]}
        scores[precision] = {
            "frame_f1": {k: p["frame"]["f1"] for k, p in points.items()},
            "event_f1_live_decoder": points["live decoder"]["event"]["f1"],
            "psds1": result["psds1"]["psds"],
        }
    return {"model": model, "int8": int8, "data": data, "split": split, "frames": int(dev.size // len(ckpt.config.labels)),
            "prob_max_abs_dev": float(dev.max()), "prob_mean_abs_dev": float(dev.mean()), "scores": scores}


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
    p.add_argument("--model", required=True, help="checkpoint or bundled detector name")
    p.add_argument("--int8", required=True, help="its int8 step graph (rtsed.export --quantize int8 --streaming)")
    p.add_argument("--data", required=True, help="a train.synth folder (or TUT-SED root)")
    p.add_argument("--split", default="test")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    result = compare(args.model, args.int8, args.data, args.split)
    print(json.dumps(result, indent=1))
    print("frame F1 columns (fp32 / int8):", ", ".join(result["scores"]["fp32"]["frame_f1"]))
    print(row(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
