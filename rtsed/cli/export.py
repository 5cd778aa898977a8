"""``python -m rtsed.export --model X.pt --out X.onnx [--streaming] [--quantize int8 --calibration DIR]``:
export a checkpoint to ONNX (the offline graph, or the streaming step graph), optionally statically
quantized to int8 (rtsed.stream.onnx_quantize), and check it against torch with onnxruntime."""

from __future__ import annotations

import argparse
import sys

from rtsed.atomic import OutputError, check_writable
from rtsed.models.bundled import ModelNotFoundError, resolve_model
from rtsed.models.checkpoint import CheckpointError, load_checkpoint
from rtsed.stream.onnx_export import OPSET, ExportError, export_onnx
from rtsed.stream.onnx_quantize import CALIBRATION_METHODS, DEFAULT_PERCENTILE, PRECISIONS, QuantizeError
from rtsed.stream.onnx_runtime import check_against_torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rtsed.export", description="Export a checkpoint to ONNX.")
    p.add_argument("--model", required=True, help="checkpoint path (.pt) or bundled detector name (e.g. dnd_7_10.pt)")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--streaming", action="store_true", help="export the streaming step graph")
    p.add_argument("--opset", type=int, default=OPSET)
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-torch check after export")
    p.add_argument("--quantize", choices=PRECISIONS, default="fp32",
                   help="int8: static QDQ quantization (S8S8, per-channel weights), calibrated on --calibration")
    p.add_argument("--calibration", metavar="DIR",
                   help="folder of audio scenes from the model's training side (never its test scenes) to "
                        "calibrate --quantize int8 on; the folder, files and their hash go into the metadata")
    p.add_argument("--calibration-steps", type=int, default=512, metavar="N",
                   help="step inputs recorded for calibration, spread over all of DIR's audio (default 512)")
    p.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default="percentile",
                   help="activation ranges: each tensor's central --calibration-percentile per cent of its "
                        "calibration values (default), or their whole min..max (minmax)")
    p.add_argument("--calibration-percentile", type=float, default=DEFAULT_PERCENTILE, metavar="P",
                   help=f"per cent of each tensor's values kept in range (default {DEFAULT_PERCENTILE:g})")
    args = p.parse_args(argv)
    if not 50.0 < args.calibration_percentile <= 100.0:
        p.error(f"--calibration-percentile {args.calibration_percentile:g}: give a share in (50, 100], e.g. 99.999")
    if args.quantize == "int8" and not args.calibration:
        p.error("--quantize int8 needs --calibration DIR: a folder of audio scenes from the model's training side")
    if args.calibration and args.quantize != "int8":
        p.error("--calibration is for --quantize int8")
    try:
        check_writable(args.out, "--out")
        ckpt = load_checkpoint(resolve_model(args.model))
        if args.quantize == "int8":
            from rtsed.stream.onnx_quantize import export_int8

            out = export_int8(ckpt.model, ckpt.config, args.out, args.calibration, streaming=args.streaming,
                              max_steps=args.calibration_steps, method=args.calibration_method,
                              percentile=args.calibration_percentile)
        else:
            out = export_onnx(ckpt.model, ckpt.config, args.out, streaming=args.streaming, opset=args.opset)
    except (CheckpointError, ExportError, ModelNotFoundError, OutputError, QuantizeError) as exc:
        print(f"rtsed.export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.quantize} {'step' if args.streaming else 'offline'} graph, "
          f"{ckpt.config.model.name}, {len(ckpt.config.labels)} classes)")
    if not args.no_check:
        worst = check_against_torch(out, ckpt.model)
        note = ("" if args.quantize == "fp32" else " (int8: random input lies outside the calibrated ranges; "
                "python -m benchmarks.int8_accuracy measures int8 against fp32 on audio)")
        print(f"onnxruntime vs torch on random input: max |diff| of logits {worst:.2e}{note}")
    return 0

