"""``python -m train.tune``: per-class decoder thresholds tuned on the validation split.

    python -m train.tune --model runs/dnd_7_10/best.pt --data scenes/ --out runs/dnd_7_10/tuned.pt

For each class, every (on, off) pair of a grid is run through the live decoder itself (hysteresis,
minimum event and gap durations, smoothing as the checkpoint's decoder config says); the decoded
events are put back on the frame grid and scored by frame F1 against the reference. The best pair
per class is written into a copy of the checkpoint (``config.decoder``), which is what rtsed.live
and rtsed.detect then use. Tuned on validation, never on test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from rtsed.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rtsed.config import DecoderConfig
from rtsed.serve.decode import decode_offline

ON_GRID = tuple(round(x, 2) for x in np.arange(0.10, 0.91, 0.05))
OFF_DROPS = (0.0, 0.1, 0.2)  # off = on - drop (hysteresis width)


def decoded_frames(probs: np.ndarray, hop_s: float, decoder: DecoderConfig) -> np.ndarray:
    """(T,) probabilities of one class -> (T,) bool frames covered by decoded events."""
    events = decode_offline(probs[:, None], ("c",), hop_s, decoder)
    active = np.zeros(probs.shape[0], bool)
    for e in events:
        active[int(round(e.onset_s / hop_s)):int(round(e.offset_s / hop_s))] = True
    return active


def f1(pred: np.ndarray, ref: np.ndarray) -> float:
    tp = float(np.sum(pred & ref))
    denom = 2 * tp + float(np.sum(pred & ~ref)) + float(np.sum(~pred & ref))
    return 2 * tp / denom if denom else 0.0


def tune_thresholds(outputs, hop_s: float, base: DecoderConfig, n_classes: int) -> tuple[DecoderConfig, list[dict]]:
    """Best (on, off) per class over the grid; returns the tuned config and a per-class table."""
    on_best, off_best, table = [], [], []
    for c in range(n_classes):
        ref = np.concatenate([o.targets[:, c] > 0.5 for o in outputs])
        best = (-1.0, 0.5, 0.5)
        for on in ON_GRID:
            for drop in OFF_DROPS:
                off = round(on - drop, 2)
                if off < 0.05:
                    continue
                config = base.replace(on_thresholds=(on,), off_thresholds=(off,))
                pred = np.concatenate([decoded_frames(o.probs[:, c], hop_s, config) for o in outputs])
                score = f1(pred, ref)
                if score > best[0] + 1e-9:
                    best = (score, on, off)
        default = np.concatenate([decoded_frames(o.probs[:, c], hop_s, base.replace(on_thresholds=(0.5,),
                                                                                    off_thresholds=(0.5,)))
                                  for o in outputs])
        table.append({"class": c, "on": best[1], "off": best[2], "f1_tuned": best[0], "f1_at_0.5": f1(default, ref)})
        on_best.append(best[1])
        off_best.append(best[2])
    return base.replace(on_thresholds=tuple(on_best), off_thresholds=tuple(off_best)), table


def main(argv: list[str] | None = None) -> int:
    from train.data_sources import open_dataset
    from train.evaluate import predict

    p = argparse.ArgumentParser(prog="python -m train.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint to tune (.pt)")
    p.add_argument("--data", help="data root (TUT-SED 2016 or train.synth output)")
    p.add_argument("--val-data", nargs=2, metavar=("AUDIO_DIR", "TSV"), help="a DCASE-format validation split")
    p.add_argument("--split", default="validate")
    p.add_argument("--out", required=True, help="output checkpoint with the tuned decoder thresholds")
    p.add_argument("--min-event-s", type=float, help="also set the decoder's minimum event duration")
    p.add_argument("--min-gap-s", type=float, help="also set the decoder's minimum gap")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    args.train_data = args.test_data = None
    args.labels = None
    try:
        ckpt = load_checkpoint(args.model)
    except CheckpointError as exc:
        print(f"train.tune: {exc}", file=sys.stderr)
        return 2
    dataset = open_dataset(args)
    outputs = predict(ckpt, dataset.split(args.split), cache_dir=args.cache_dir)
    base = ckpt.config.decoder
    if args.min_event_s is not None:
        base = base.replace(min_event_s=args.min_event_s)
    if args.min_gap_s is not None:
        base = base.replace(min_gap_s=args.min_gap_s)
    tuned, table = tune_thresholds(outputs, ckpt.config.frontend.hop_s, base, len(ckpt.config.labels))
    config = ckpt.config.replace(decoder=tuned)
    metadata = dict(ckpt.metadata, tuned_on=f"{args.data or args.val_data} split {args.split}",
                    tuning=[dict(row, label=ckpt.config.labels[row["class"]]) for row in table])
    save_checkpoint(Path(args.out), ckpt.model, config, metadata)
    print(f"{'label':>18}  {'on':>5} {'off':>5}  frame F1 tuned / at 0.5")
    for row in table:
        print(f"{ckpt.config.labels[row['class']]:>18}  {row['on']:5.2f} {row['off']:5.2f}  "
              f"{row['f1_tuned']:.3f} / {row['f1_at_0.5']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
