"""A per-frame reference of the decoder's rules for one class, written as plainly as possible: the
oracle that train.tune's vectorised search (``smooth_and_join``, ``joined_events``,
``decode_joined``) and rtsed.serve.decode's streaming decoder are checked against."""

from __future__ import annotations

import numpy as np


def median_smooth(x: np.ndarray, k: int) -> np.ndarray:
    """The decoder's causal median over k frames with edge padding: (T,) -> (T,), frame t is the
    median of frames t-k+1..t, the first frame repeated before the start (rtsed.decode rule 1)."""
    if k == 1:
        return x
    padded = np.concatenate([np.full(k - 1, x[0]), x])
    n = x.shape[0]
    return np.median(np.stack([padded[i:i + n] for i in range(k)]), axis=0)


def decode_smoothed(s: np.ndarray, delay_frames: int, on: float, off: float, min_event_frames: int,
                    gap_frames: int) -> list[tuple[int, int]]:
    """Events of one class as frame cells [a, b) from an already smoothed (T,) signal, by the
    decoder's rules 2-4 (hysteresis, gap merging, minimum duration) and its delay compensation:
    onsets and closed offsets move back by ``delay_frames`` (clamped at 0); an event still open at
    the end of the signal ends at its last frame."""
    n = s.shape[0]
    above, below = s >= on, s < off
    runs: list[list[int]] = []
    t = 0
    while t < n:
        starts = np.flatnonzero(above[t:])
        if starts.size == 0:
            break
        a = t + int(starts[0])
        ends = np.flatnonzero(below[a:])
        b = a + int(ends[0]) if ends.size else n
        if runs and a - runs[-1][1] < gap_frames:
            runs[-1][1] = b
        else:
            runs.append([a, b])
        t = b if b > a else a + 1
    out = []
    for a, b in runs:
        if b - a < min_event_frames:
            continue
        onset = max(a - delay_frames, 0)
        offset = n if b == n else b - delay_frames
        out.append((onset, offset))
    return out
