"""Validation files heard a fraction of a hop later: the same audio with its first samples cut off.

A recording does not know where the detector's 20 ms frames fall; a capture that starts 10 ms
later cuts the same sound into other frames, and probabilities that hover near a threshold then
flicker into other events. Tuning a decoder on each validation file at several such shifts makes
it choose thresholds and durations whose events hold at all of them (benchmarks.event_stability
measures how many do).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rtsed.audio.files import read_audio
from rtsed.audio.frontend import LogMel
from rtsed.models.checkpoint import Checkpoint
from rtsed.serve.detector import Detector
from train.annotations import Event, events_to_frame_targets
from train.evaluate import FileOutput
from train.inference import file_logits


def shift_events(events: Sequence[Event], shift_s: float) -> tuple[Event, ...]:
    """Reference events of a file whose first ``shift_s`` seconds were cut off, on the cut file's
    timeline: every time moves back by the shift; an event that ended before the cut is gone and
    one that straddles it starts at 0."""
    out = []
    for e in events:
        onset, offset = e.onset_s - shift_s, e.offset_s - shift_s
        if offset > 0:
            out.append(Event(e.filename, max(onset, 0.0), offset, e.event_label))
    return tuple(out)


@torch.no_grad()
def shifted_outputs(checkpoint: Checkpoint, outputs: Sequence[FileOutput], shift_s: float) -> list[FileOutput]:
    """train.evaluate.predict's outputs for the same files with their first ``shift_s`` seconds
    (rounded to whole samples) cut off: probabilities (T', C) from the checkpoint's detector, the
    reference events and frame targets moved with the audio. Keys get an ``@<ms>ms`` suffix."""
    config = checkpoint.config
    rate, hop_s, labels = config.frontend.sample_rate_hz, config.frontend.hop_s, config.labels
    cut = int(round(shift_s * rate))
    if cut < 0:
        raise ValueError(f"shift {shift_s} s: a shift cuts samples off the start, give one >= 0")
    detector = Detector(config, checkpoint.model).eval()
    logmel = LogMel(config.frontend)
    exact_shift_s = cut / rate
    shifted = []
    for o in outputs:
        samples = read_audio(o.path, rate)[cut:]
        feats = logmel(torch.from_numpy(np.ascontiguousarray(samples))).numpy()
        if feats.shape[0] == 0:
            continue
        probs = torch.sigmoid(file_logits(detector, feats).float()).cpu().numpy()
        events = shift_events(o.events, exact_shift_s)
        targets = events_to_frame_targets(events, probs.shape[0], hop_s, labels)
        shifted.append(FileOutput(f"{o.key}@{exact_shift_s * 1000:g}ms", o.path, probs, targets, events,
                                  max(o.duration_s - exact_shift_s, 0.0)))
    return shifted
