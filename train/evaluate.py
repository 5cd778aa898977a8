"""``python -m train.evaluate``: score a checkpoint on a data split, with the paper's metric and
DCASE's.

    python -m train.evaluate --model runs/dnd_7_10/best.pt --data scenes/ [--split test]
    python -m train.evaluate --model best.pt --test-data AUDIO_DIR annotations.tsv --json scores.json

Each file of the split runs OFFLINE through the checkpoint's own detector on the whole file: log-mel
with the checkpoint's front-end config (through the same feature cache as ``train.fit``, so
evaluation reuses training's features), the checkpoint's normalisation, one model forward over the
full sequence, sigmoid. The checkpoint's labels define the columns; a reference event whose label
is not among them is an error naming the file and the label.

Scores (docs/reference.md "Metrics"; every one is reported with its parameters):

* frame-wise F1 and ER of the paper (micro over every frame of every file, ``p >= threshold``);
* segment-based F1/ER on 1 s segments and event-based F1/ER as DCASE scores it (onset within
  200 ms, offset within max(200 ms, 20 % of the event's length); also onset-only) (sed_eval), from events decoded by a plain threshold (runs of active frames; no hysteresis,
  minimum duration or smoothing) and, as a last operating point, from the live decoder
  (rtsed.serve.decode with the checkpoint's thresholds, minimum durations and smoothing: the events a
  user of rtsed.live or rtsed.detect gets);
* PSDS scenarios 1 and 2 (sed_scores_eval; threshold-independent);
* a per-class table of all of them.

They are computed at ``--threshold`` (0.5) and, when the checkpoint's decoder config has per-class
``on_thresholds``, also at those. ``--json`` writes everything machine-readable.

Bad input (a broken checkpoint, a data set that cannot be read, an unknown label) exits with
status 2 and a message naming the file, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtsed.backends.allocator import ensure_caching_allocator
from rtsed.audio.files import AudioFileError
from rtsed.models.bundled import ModelNotFoundError, resolve_model
from rtsed.models.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from rtsed.config import ConfigError, DecoderConfig
from rtsed.serve.decode import decode_offline, smoothed_scores
from rtsed.serve.detector import Detector
from rtsed.stream.onnx_runtime import OnnxModelError
from rtsed.metrics import (
    event_scores,
    frame_probs_to_events,
    frame_scores,
    per_class_scores,
    psds,
    segment_scores,
)
from rtsed.models.model import count_parameters
from train.annotations import AnnotationError, Event, events_to_frame_targets
from train.datasets import DatasetError, audio_info
from train.false_alarms import FalseAlarmError
from train.inference import InMemoryFeatures, file_logits

SEGMENT_S = 1.0  # DCASE segment-based metrics
COLLAR_S = 0.2  # DCASE event-based metrics: onset collar, and the offset collar's floor
OFFSET_FRACTION = 0.2  # offset collar: max(COLLAR_S, 20 % of the reference event's length)
DEFAULT_THRESHOLD = 0.5  # the paper's
DECODE_NOTE = ("plain threshold: p >= threshold per frame, each run of active frames [a, b) -> event "
               "[a*hop, b*hop); no hysteresis, minimum duration or smoothing")
JSON_FORMAT = "rtsed-evaluation"
JSON_VERSION = 1


class EvaluationError(ValueError):
    """Input that cannot be evaluated (e.g. a reference label the checkpoint does not know)."""


@dataclasses.dataclass
class FileOutput:
    """One evaluated file: probabilities and targets (T, C), reference events, audio length."""

    key: str  # unique name of the file in sed_eval / PSDS (its path as given)
    path: Path
    probs: np.ndarray
    targets: np.ndarray
    events: tuple[Event, ...]
    duration_s: float


# ------------------------------------------------------------------------------------- inference


def _as_pair(item: Any) -> tuple[Path, tuple[Event, ...], float | None]:
    """A DataItem or an ``(audio_path, events)`` pair -> (path, events, duration_s or None)."""
    if hasattr(item, "audio_path"):
        return Path(item.audio_path), tuple(item.events), getattr(item, "duration_s", None)
    path, events = item
    return Path(path), tuple(events), None


def _check_labels(path: Path, events: Iterable[Event], labels: Sequence[str]) -> None:
    known = set(labels)
    for e in events:
        if e.event_label not in known:
            raise EvaluationError(
                f"{path}: reference label {e.event_label!r} (event {e.onset_s}-{e.offset_s} s) is not "
                f"one of the checkpoint's labels {list(labels)}; evaluate on data with the classes "
                "the model was trained on"
            )


def predict(
    checkpoint: Checkpoint,
    items: Sequence[Any],
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    onnx: str | Path | None = None,
) -> list[FileOutput]:
    """Run every item (DataItem or ``(audio_path, events)``) through the checkpoint's detector,
    or, given ``onnx``, through that exported graph of it (train.inference.onnx_logits)."""
    config = checkpoint.config
    labels = config.labels
    hop_s = config.frontend.hop_s
    detector = Detector(config, checkpoint.model).to(device).eval()
    if cache_dir is not None:
        from train.features import FeatureCache  # the same cache (and key) as train.fit

        cache: Any = FeatureCache(cache_dir, config.frontend)
    else:
        cache = InMemoryFeatures(config.frontend)
    pairs, seen = [_as_pair(item) for item in items], set()
    for path, events, _ in pairs:  # every label checked before any inference
        _check_labels(path, events, labels)
        if str(path) in seen:
            raise EvaluationError(f"{path}: listed twice in the evaluation split")
        seen.add(str(path))
    from_onnx = None
    if onnx is not None:
        from rtsed.stream.onnx_runtime import OnnxFile
        from train.inference import onnx_logits

        onnx_labels = list(OnnxFile.open(onnx).config.labels)
        if onnx_labels != list(labels):
            raise EvaluationError(f"--onnx {onnx}: its labels {onnx_labels} are not the checkpoint's {list(labels)}; "
                                  "give the checkpoint it was exported from")
        from_onnx = onnx_logits(onnx)
    outputs = []
    for path, events, duration_s in pairs:
        key = str(path)
        if duration_s is None:
            duration_s = audio_info(path)[0]
        feats = cache.get(path)
        if feats.shape[0] == 0:
            raise EvaluationError(f"{path}: shorter than one analysis window "
                                  f"({config.frontend.window_s * 1000:.0f} ms): no frames to score")
        logits = file_logits(detector, feats) if from_onnx is None else torch.from_numpy(from_onnx(feats))
        if logits.shape != (feats.shape[0], len(labels)):
            raise EvaluationError(f"{path}: model returned {tuple(logits.shape)} for {feats.shape[0]} frames "
                                  f"and {len(labels)} classes")
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        targets = events_to_frame_targets(events, probs.shape[0], hop_s, labels)
        outputs.append(FileOutput(key, path, probs, targets, events, float(duration_s)))
    if not outputs:
        raise EvaluationError("nothing to evaluate: the split has no files")
    return outputs


# ---------------------------------------------------------------------------------------- scoring


def _operating_points(checkpoint: Checkpoint, threshold: float) -> list[tuple[str, Any]]:
    """(name, threshold) pairs: the fixed threshold, then the decoder's per-class ones if set."""
    points: list[tuple[str, Any]] = [(f"threshold {threshold:g}", float(threshold))]
    decoder = checkpoint.config.decoder
    if decoder.on_thresholds:
        on, _ = decoder.thresholds(len(checkpoint.config.labels))
        points.append(("decoder on_thresholds", tuple(float(v) for v in on)))
    return points


def _clean(value: Any) -> Any:
    """Plain JSON types: dataclasses/tuples/numpy -> dicts/lists/floats, nan/inf -> None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # sed_eval's text report stays out: the numbers are all there.
        return {f.name: _clean(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "report"}
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _decoded_activity(outputs: list[FileOutput], labels: Sequence[str], hop_s: float,
                      decoder: DecoderConfig) -> tuple[list[np.ndarray], list[tuple]]:
    """The live decoder on whole files (``rtsed.serve.decode.decode_offline``: hysteresis, minimum
    event and gap durations, smoothing, as the checkpoint configures them): per-file frame
    activity (T, C) in {0, 1} and the (file, onset, offset, label) events."""
    activity, estimated = [], []
    for o in outputs:
        events = decode_offline(o.probs, labels, hop_s, decoder)
        estimated += [(o.key, e.onset_s, e.offset_s, e.label) for e in events]
        activity.append(events_to_frame_targets(
            [Event(o.key, e.onset_s, e.offset_s, e.label) for e in events], o.probs.shape[0], hop_s, labels))
    return activity, estimated


def _per_class_text(value: Any) -> str:
    """A decoder field that is one number or one per class, for the report's decode note."""
    return f"{value:g}" if not isinstance(value, tuple) else "[" + ", ".join(f"{v:g}" for v in value) + "]"


def _score_point(outputs: list[FileOutput], labels: Sequence[str], hop_s: float, name: str,
                 threshold: Any, reference: list[tuple], durations: dict[str, float],
                 decoder: DecoderConfig | None = None) -> dict[str, Any]:
    """Scores at one operating point: a threshold on the probabilities (plain decode), or, with
    ``decoder``, the live decoder's events (frame scores then count its active frames)."""
    targets = [o.targets for o in outputs]
    if decoder is None:
        probs = [o.probs for o in outputs]
        estimated = [(o.key, on, off, lab) for o in outputs
                     for on, off, lab in frame_probs_to_events(o.probs, hop_s, labels, threshold)]
        decode_note = DECODE_NOTE
    else:
        probs, estimated = _decoded_activity(outputs, labels, hop_s, decoder)
        threshold = 0.5  # on the decoder's 0/1 activity
        decode_note = (f"the live decoder (rtsed.serve.decode): on {list(decoder.on_thresholds) or 0.5}, "
                       f"off {list(decoder.off_thresholds) or 'on'}, min event {_per_class_text(decoder.min_event_s)} s, "
                       f"min gap {_per_class_text(decoder.min_gap_s)} s, "
                       f"median smoothing {_per_class_text(decoder.smoothing_frames)} frames")
    frame = frame_scores(probs, targets, threshold)
    frame_cls = per_class_scores(probs, targets, threshold, labels)
    seg = segment_scores(reference, estimated, labels, segment_s=SEGMENT_S, durations=durations)
    ev = event_scores(reference, estimated, labels, collar_s=COLLAR_S, evaluate_offset=True,
                      offset_fraction=OFFSET_FRACTION)
    ev_onset = event_scores(reference, estimated, labels, collar_s=COLLAR_S)
    per_class = {}
    for c in frame_cls:
        s, e, eo = seg.per_class[c.label], ev.per_class[c.label], ev_onset.per_class[c.label]
        per_class[c.label] = {
            "frame": _clean(c), "segment": _clean(s), "event": _clean(e), "event_onset": _clean(eo),
        }
    return {
        "name": name,
        "threshold": _clean(threshold) if decoder is None else "decoder",
        "decode": decode_note,
        "n_estimated_events": len(estimated),
        "frame": {**_clean(frame.to_dict()), "params": _clean(
            {**frame.params, "definition": "docs/reference.md Metrics (Cakir et al. 2017): micro F1 over "
             "frame x class cells; ER = (S + D + I) / N per frame"})},
        "segment": {**_clean(seg), "params": _clean({**seg.params, "decode": decode_note})},
        "event": {**_clean(ev), "params": _clean({**ev.params, "decode": decode_note})},
        "event_onset": {**_clean(ev_onset), "params": _clean({**ev_onset.params, "decode": decode_note})},
        "per_class": per_class,
    }


def _psds(outputs: list[FileOutput], labels: list[str], hop_s: float,
          durations: dict[str, float], scenario: int = 1) -> dict[str, Any]:
    """PSDS of scenario 1 or 2 over the classes that have reference events (sed_scores_eval
    refuses a class without any); the others are listed in ``classes_excluded``."""
    present = {e.event_label for o in outputs for e in o.events}
    keep = [c for c, label in enumerate(labels) if label in present]
    kept = [labels[c] for c in keep]
    out: dict[str, Any] = {"psds": None, "per_class": {}, "error": None,
                           "params": {"metric": f"PSDS scenario {scenario} (sed_scores_eval)"},
                           "classes_excluded": [label for label in labels if label not in present]}
    if not keep:
        out["error"] = "no reference events in the split"
        return out
    if scenario == 2 and len(keep) < 2:  # sed_scores_eval's cross-trigger statistics fail on one class
        out["error"] = "PSDS2 counts cross-triggers between classes: it needs two classes with reference events"
        return out
    try:
        ps = psds({o.key: (o.probs[:, keep], hop_s, kept) for o in outputs},
                  {o.key: [(e.onset_s, e.offset_s, e.event_label) for e in o.events] for o in outputs},
                  durations=durations, scenario=scenario)
    except (ValueError, RuntimeError, AssertionError) as exc:  # sed_scores_eval checks with assert
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    out.update(psds=_clean(ps.psds), per_class=_clean(ps.per_class), params=_clean(ps.params))
    return out


def evaluate(
    checkpoint: str | os.PathLike | Checkpoint,
    items: Sequence[Any],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    data: str = "",
    split: str = "",
    onnx: str | Path | None = None,
    outputs: Sequence[FileOutput] | None = None,
) -> dict[str, Any]:
    """Score a checkpoint on files with reference events; returns a plain dict (JSON-ready).

    checkpoint: a path (loaded with rtsed.load_checkpoint; CheckpointError on a broken file) or a
        loaded Checkpoint.
    items: DataItems (``SedDataset.split(name)``) or ``(audio_path, events)`` pairs
        (``SedDataset.pairs(name)``); events are train.annotations.Event.
    threshold: the fixed decision threshold (``p >= threshold``); the decoder's per-class
        on_thresholds are scored as a second operating point when the checkpoint has them.
    cache_dir: a FeatureCache root (shared with train.fit), or None to compute features in memory.
    data, split: descriptions for the report.
    onnx: score this exported graph of the checkpoint instead of its torch model (a step graph
        streamed at 16 frames per step, e.g. an int8 one from ``rtsed.export --quantize int8``).
    outputs: ``predict(checkpoint, items, onnx=onnx)`` already computed for these items (a caller
        that also compares the probabilities themselves need not run the detector twice).

    Keys: ``format``, ``model``, ``data``, ``operating_points`` (one dict per threshold: frame,
    segment, event scores with their ``params``, per_class), ``psds1`` and ``psds2``
    (threshold-independent, on the model's probabilities), ``psds1_decoder`` and ``psds2_decoder``
    (on the decoder's median-smoothed scores, ``rtsed.serve.decode.smoothed_scores``; the live
    decoder's per-class PSDS are these),
    ``summary`` (the headline numbers at the first operating point), ``per_file``.
    """
    if not 0.0 < float(threshold) < 1.0:
        raise EvaluationError(f"threshold must lie in (0, 1), got {threshold}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, "cpu")
    started = time.perf_counter()
    config = ckpt.config
    labels = list(config.labels)
    hop_s = config.frontend.hop_s
    if outputs is None:
        outputs = predict(ckpt, list(items), cache_dir=cache_dir, device=device, onnx=onnx)
    inference_s = time.perf_counter() - started

    reference = [(o.key, e.onset_s, e.offset_s, e.event_label) for o in outputs for e in o.events]
    durations = {o.key: o.duration_s for o in outputs}
    points = [_score_point(outputs, labels, hop_s, name, th, reference, durations)
              for name, th in _operating_points(ckpt, threshold)]
    points.append(_score_point(outputs, labels, hop_s, "live decoder", None, reference, durations,
                               decoder=config.decoder))

    psds_1 = _psds(outputs, labels, hop_s, durations, scenario=1)
    psds_2 = _psds(outputs, labels, hop_s, durations, scenario=2)
    # The decoder thresholds its median-smoothed scores, so the live decoder's threshold-free
    # scores are PSDS on those (as DCASE systems score their post-processed outputs).
    if max(config.decoder.per_class("smoothing_frames", len(labels))) > 1:
        smoothed = [dataclasses.replace(o, probs=smoothed_scores(o.probs, labels, config.decoder)) for o in outputs]
        psds_1_dec = _psds(smoothed, labels, hop_s, durations, scenario=1)
        psds_2_dec = _psds(smoothed, labels, hop_s, durations, scenario=2)
    else:  # no smoothing: the decoder thresholds the model's scores themselves
        psds_1_dec, psds_2_dec = psds_1, psds_2
    for point in points:
        p1, p2 = (psds_1_dec, psds_2_dec) if point["threshold"] == "decoder" else (psds_1, psds_2)
        for label in labels:
            point["per_class"][label]["psds1"] = p1["per_class"].get(label)
            point["per_class"][label]["psds2"] = p2["per_class"].get(label)

    duration_s = sum(o.duration_s for o in outputs)
    first = points[0]
    model_cfg = config.model
    return {
        "format": JSON_FORMAT,
        "format_version": JSON_VERSION,
        "model": {
            "name": model_cfg.name,
            "checkpoint": str(ckpt.path) if ckpt.path is not None else None,
            "labels": labels,
            "parameters": count_parameters(ckpt.model),
            "lookahead_frames": model_cfg.lookahead_frames,
            "config": _clean(config.to_dict() | {"normalization": None}),
            "epoch": _clean(ckpt.metadata.get("epoch")),
        },
        "data": {
            "description": data, "split": split, "n_files": len(outputs),
            "n_events": len(reference), "duration_s": duration_s, "hours": duration_s / 3600,
            "n_frames": int(sum(o.probs.shape[0] for o in outputs)), "hop_s": hop_s,
        },
        "inference": {"mode": "offline, whole file, one forward" if onnx is None else f"onnxruntime: {onnx}",
                      "device": str(device), "seconds": inference_s},
        "operating_points": points,
        "psds1": psds_1,
        "psds2": psds_2,
        "psds1_decoder": psds_1_dec,
        "psds2_decoder": psds_2_dec,
        "summary": {
            "threshold": first["threshold"],
            "frame_f1": first["frame"]["f1"], "frame_er": first["frame"]["error_rate"],
            "segment_f1": first["segment"]["f1"], "segment_er": first["segment"]["error_rate"],
            "event_f1": first["event"]["f1"], "event_er": first["event"]["error_rate"],
            "psds1": psds_1["psds"], "psds2": psds_2["psds"],
            "psds1_decoder": psds_1_dec["psds"], "psds2_decoder": psds_2_dec["psds"],
        },
        "per_file": [
            {"path": o.key, "duration_s": o.duration_s, "n_frames": int(o.probs.shape[0]),
             "n_events": len(o.events),
             "frame_f1": frame_scores(o.probs, o.targets, first["threshold"]).f1}
            for o in outputs
        ],
    }


# ----------------------------------------------------------------------------------------- report


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _threshold_text(th: Any) -> str:
    if isinstance(th, list):
        return "per class [" + ", ".join(f"{v:g}" for v in th) + "]"
    return f"{th:g}"


def _point_title(point: dict[str, Any]) -> str:
    if point["threshold"] == "decoder":
        return "the live decoder's events (hysteresis, minimum durations, smoothing)"
    if isinstance(point["threshold"], list):
        return f"the decoder's on_thresholds, {_threshold_text(point['threshold'])}"
    return f"threshold {_threshold_text(point['threshold'])}"


def format_report(results: dict[str, Any]) -> str:
    """The evaluation as readable text: header, scores with their parameters, per-class tables."""
    m, d = results["model"], results["data"]
    fe = m["config"]["frontend"]
    lines = [
        "rtsed evaluation",
        f"  model       {m['name']} ({len(m['labels'])} classes, {m['parameters']:,} parameters, "
        f"lookahead {m['lookahead_frames']} frames)" + (f", epoch {m['epoch']}" if m["epoch"] is not None else ""),
        f"  checkpoint  {m['checkpoint']}",
        f"  data        {d['description']}" + (f", split {d['split']!r}" if d["split"] else ""),
        f"              {d['n_files']} files, {d['hours']:.3f} h ({d['duration_s']:.1f} s), "
        f"{d['n_events']} reference events, {d['n_frames']} frames of {d['hop_s'] * 1000:g} ms",
        f"  front end   {fe['sample_rate_hz']} Hz, window {fe['window_samples']} / hop {fe['hop_samples']} "
        f"samples, {fe['n_mels']} mel bands; offline inference on whole files "
        f"({results['inference']['device']}, {results['inference']['seconds']:.1f} s with features)",
        f"  decoding    {DECODE_NOTE} (for segment and event metrics)",
    ]
    for point in results["operating_points"]:
        fr, sg, ev = point["frame"], point["segment"], point["event"]
        lines += [
            "",
            f"Scores at {_point_title(point)} ({point['n_estimated_events']} estimated events)",
            f"  {'metric':<28} {'F1':>6} {'ER':>6} {'P':>6} {'R':>6}  parameters",
            f"  {'frame-wise (paper)':<28} {_f(fr['f1']):>6} {_f(fr['error_rate']):>6} {_f(fr['precision']):>6} "
            f"{_f(fr['recall']):>6}  p >= threshold on sigmoid(logits), micro over {fr['n_frames']} frames "
            f"x {len(m['labels'])} classes; S/D/I = {fr['substitutions']}/{fr['deletions']}/{fr['insertions']}, "
            f"N = {fr['n_ref']}",
            f"  {'segment-based (sed_eval)':<28} {_f(sg['f1']):>6} {_f(sg['error_rate']):>6} "
            f"{_f(sg['precision']):>6} {_f(sg['recall']):>6}  {sg['segment_s']:g} s segments, micro; "
            f"macro F1 {_f(sg['macro_f1'])}",
            f"  {'event-based (sed_eval)':<28} {_f(ev['f1']):>6} {_f(ev['error_rate']):>6} "
            f"{_f(ev['precision']):>6} {_f(ev['recall']):>6}  collar {ev['collar_s']:g} s, "
            f"{'offset max(' + format(ev['collar_s'], 'g') + ' s, ' + format(100 * ev['offset_fraction'], 'g') + ' %)' if ev['evaluate_offset'] else 'onset only'}, {ev['matching']} matching, "
            f"micro; macro F1 {_f(ev['macro_f1'])}",
        ]
        eo = point.get("event_onset")
        if eo is not None:
            lines.append(
                f"  {'event-based, onset only':<28} {_f(eo['f1']):>6} {_f(eo['error_rate']):>6} "
                f"{_f(eo['precision']):>6} {_f(eo['recall']):>6}  collar {eo['collar_s']:g} s, onset only, "
                f"{eo['matching']} matching, micro; macro F1 {_f(eo['macro_f1'])}")
        lines += ["", f"Per class at {_point_title(point)} (ref frames and ref events: reference counts)",
                  f"  {'label':<20} {'ref frames':>10} {'frame F1':>8} {'frame ER':>8} {'seg F1':>7} "
                  f"{'seg ER':>7} {'ref events':>10} {'event F1':>8} {'PSDS1':>6} {'PSDS2':>6}"]
        for label, c in point["per_class"].items():
            lines.append(
                f"  {label:<20} {c['frame']['n_ref']:>10} {_f(c['frame']['f1']):>8} "
                f"{_f(c['frame']['error_rate']):>8} {_f(c['segment']['f1']):>7} {_f(c['segment']['error_rate']):>7} "
                f"{c['event']['n_ref']:>10} {_f(c['event']['f1']):>8} {_f(c['psds1']):>6} "
                f"{_f(c.get('psds2')):>6}"
            )
    lines.append("")
    for key in ("psds1", "psds2", "psds1_decoder", "psds2_decoder"):
        ps = results.get(key)
        if ps is None:  # JSON written before PSDS2 (or PSDS on the decoder's scores) was reported
            continue
        name = key[:5].upper()
        if key.endswith("_decoder"):
            if results.get(key[:5]) == ps:  # no smoothing: the same scores as above (also once read back from JSON)
                continue
            name += " on the decoder's smoothed scores"
        if ps["error"]:
            lines.append(f"{name} (sed_scores_eval): not computed ({ps['error']})")
            continue
        p = ps["params"]
        lines.append(
            f"{name} (sed_scores_eval, threshold-independent): {_f(ps['psds'])}  "
            f"dtc {p['dtc_threshold']:g}, gtc {p['gtc_threshold']:g}, cttc {p['cttc_threshold']}, "
            f"alpha_ct {p['alpha_ct']:g}, alpha_st {p['alpha_st']:g}, max eFPR {p['max_efpr']:g} per "
            f"{p['unit_of_time']}; {p['n_gt_merged']} overlapping reference events merged"
        )
        if ps["classes_excluded"]:
            lines.append(f"  classes without reference events, left out of {name}: {ps['classes_excluded']}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="checkpoint file (e.g. runs/dnd_7_10/best.pt) or a bundled detector's name (dnd_7_10)")
    p.add_argument("--data", help="TUT-SED Synthetic 2016 root, or a folder written by train.synth")
    p.add_argument("--test-data", nargs=2, metavar=("AUDIO_DIR", "TSV"), help="a DCASE-format split")
    p.add_argument("--split", help="split of --data to score (default: test)")
    p.add_argument("--onnx", metavar="FILE", help="score this graph exported from --model (rtsed.export; a step graph "
                   "is streamed 16 frames per step) instead of the checkpoint's torch model")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="fixed decision threshold on probabilities (default 0.5, the paper's)")
    p.add_argument("--json", metavar="PATH", help="also write every score, parameter and per-class row as JSON")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="compute device")
    p.add_argument("--cache-dir", default=os.environ.get("RTSED_CACHE", str(Path.home() / ".cache/rtsed/features")),
                   help="feature cache shared with train.fit (keyed by front-end config)")
    p.add_argument("--no-cache", action="store_true", help="compute features in memory, write no cache")
    p.add_argument("--false-alarms", metavar="DIR",
                   help="also count false alarms per minute on every audio file under DIR (audio in which no "
                        "target class sounds; speech/music events are right on speech/music files; see "
                        "train/false_alarms.py); alone, without --data/--test-data, only that")
    return p


def _items_from_args(args: argparse.Namespace) -> tuple[list[Any], str, str]:
    from train.data_sources import open_dataset

    if args.test_data and args.split not in (None, "test"):
        raise EvaluationError(f"--test-data is the 'test' split; --split {args.split!r} needs --data")
    split = args.split or "test"
    ns = argparse.Namespace(data=args.data, test_data=args.test_data, train_data=None, val_data=None,
                            labels=None)
    dataset = open_dataset(ns)
    return dataset.split(split), dataset.name, split


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda: no CUDA device is available to this torch")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(resolve_model(args.model), "cpu")  # first: a broken model file fails before data work
    results: dict[str, Any] = {}
    if args.data or args.test_data or not args.false_alarms:
        items, data_name, split = _items_from_args(args)
        results = evaluate(ckpt, items, threshold=args.threshold, device=device, data=data_name, split=split,
                           cache_dir=None if args.no_cache else args.cache_dir, onnx=args.onnx)
        print(format_report(results))
    if args.false_alarms:
        from train.false_alarms import false_alarms, format_false_alarms

        results["false_alarms"] = false_alarms(ckpt, args.false_alarms, device)
        print(("\n" if len(results) > 1 else "") + format_false_alarms(results["false_alarms"]))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        print(f"\nwrote {path}")
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0, or 2 for bad input with a one-line reason)."""
    args = build_parser().parse_args(argv)
    if argv is None:  # as a command: whole-file forwards allocate big tensors (see rtsed.backends.allocator)
        ensure_caching_allocator()
    try:
        run(args)
    except (ModelNotFoundError, CheckpointError, DatasetError, AnnotationError, AudioFileError, EvaluationError, ConfigError,
            FalseAlarmError, OnnxModelError, ImportError, OSError) as exc:
        print(f"train.evaluate: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # train.data_sources reports bad --data/--test-data this way
        if isinstance(exc.code, str):
            print(f"train.evaluate: error: {exc.code}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
