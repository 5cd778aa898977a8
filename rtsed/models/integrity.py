"""Is a weights file still what rtsed wrote? A content hash, and a bound on weight magnitudes.

A flipped byte in a tensor's data still parses (the zip and protobuf containers carry no
checksum of it) and a flipped exponent bit turns a weight of 0.3 into 1e23 or more: finite, so a
NaN check lets it through, and the detections are silently wrong. rtsed therefore stores a
SHA-256 of what it wrote (checkpoints: the config and every tensor's name, dtype, shape and bytes;
ONNX files: the serialized graph) and checks it on load, and refuses weights whose magnitude no
trained detector has. Files written before the hash existed (the bundled detectors among them)
carry none and load as before; the magnitude bound still applies to them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

# No weight or BatchNorm statistic of a trained detector comes near this (the bundled ones stay
# below 10, folded ONNX weights included); a flipped exponent bit lands far above it.
MAX_ABS_WEIGHT = 1e6


def content_digest(config: dict[str, Any], tensors: Iterable[tuple[str, str, tuple[int, ...], bytes]]) -> str:
    """SHA-256 (hex) of a config (plain data) and named tensors given as (name, dtype, shape, raw
    bytes), in name order, so that the digest does not depend on the order they come in."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    for name, dtype, shape, data in sorted(tensors):
        h.update(f"\n{name}|{dtype}|{tuple(shape)}|{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


def modified_message(path: Path, kind: str) -> str:
    return (f"{path}: content hash mismatch: this {kind} was modified or corrupted after it was written "
            "(a flipped byte in its weights still parses, and would give wrong detections); "
            "re-download or re-export it")


def absurd_message(path: Path, worst: list[tuple[str, float]]) -> str:
    shown = ", ".join(f"{name} (max |w| = {value:.3g})" for name, value in worst[:5])
    return (f"{path}: weights of absurd magnitude, beyond {MAX_ABS_WEIGHT:.0e}: {shown}; no trained "
            "detector has such weights, so the file is corrupt: re-download, re-export or re-train it")
