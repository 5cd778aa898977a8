"""Choosing a data set from command-line arguments (shared by train.fit and train.evaluate).

    --data ROOT                          TUT-SED Synthetic 2016 (as distributed) or a train.synth folder
    --train-data DIR TSV --val-data DIR TSV [--test-data DIR TSV]   any DCASE-format splits
"""

from __future__ import annotations

import argparse
from pathlib import Path

from train.annotations import AnnotationError
from train.datasets import DatasetError, DcaseDataset, SedDataset, SynthScenes, TutSed2016


def open_dataset(args: argparse.Namespace) -> SedDataset:
    labels = [s.strip() for s in args.labels.split(",")] if getattr(args, "labels", None) else None
    dcase_splits = [(name, getattr(args, f"{name}_data", None)) for name in ("train", "val", "test")]
    given = [(name, pair) for name, pair in dcase_splits if pair]
    try:
        if given:
            if getattr(args, "data", None):
                raise SystemExit("give either --data or --train-data/--val-data, not both")
            parts = [DcaseDataset(audio_dir, tsv, labels, split={"val": "validate"}.get(name, name))
                     for name, (audio_dir, tsv) in given]
            # One class list for every split: given, else the union found (a class absent from
            # the validation split still keeps its output column).
            found = labels or sorted({label for p in parts for label in p.labels})
            if labels is None:
                parts = [DcaseDataset(audio_dir, tsv, found, split={"val": "validate"}.get(name, name))
                         for name, (audio_dir, tsv) in given]
            return SedDataset("DCASE splits", [item for p in parts for item in p.items], found)
        if not getattr(args, "data", None):
            raise SystemExit("no data: pass --data ROOT (TUT-SED 2016 or train.synth output) or "
                             "--train-data AUDIO_DIR TSV --val-data AUDIO_DIR TSV")
        root = Path(args.data)
        if not root.exists():
            raise SystemExit(f"--data {root}: no such folder")
        if (root / "manifest.json").is_file() or (root / "train" / "annotations.tsv").is_file():
            return SynthScenes(root, labels)
        return TutSed2016(root, labels=labels)
    except (DatasetError, AnnotationError) as exc:
        raise SystemExit(f"data set error: {exc}") from None
