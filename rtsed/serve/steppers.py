"""Steppers: one model backend behind one protocol, so that the engines, rtsed.detect, rtsed.live
and ``Detector.stepper()`` never know which backend runs. A new backend (TensorRT, a remote
server) is one class with the ``Stepper`` protocol.

A stepper serves ``batch_size`` independent streams: raw log-mel frames in (normalisation is the
stepper's business), per stream and row the probability of each class, the offline frame index
of the row and whether it is a real frame (rows before a stream's lookahead has filled, or after
its end, are not; docs/streaming.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from rtsed.config import DetectorConfig, NormalizationStats


@runtime_checkable
class Stepper(Protocol):
    """What an engine needs from a model backend."""

    batch_size: int  # streams stepped together
    lookahead_frames: int  # output row j of a step is offline frame position + j - lookahead_frames

    def step(self, logmel: np.ndarray, hold: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """logmel (B, n, F) raw log-mel, float32 -> (probabilities (B, n, C), frame_index (B, n)
        int64, valid (B, n) bool). hold: (B,) bool, streams that sit the step out: their state
        and position stay as they were and their rows come back invalid (``MultiStreamEngine``
        passes it only when some stream has no audio ready; a backend that cannot hold streams
        may raise then)."""
        ...

    def reset(self, streams: list[int] | None = None) -> None:
        """Start the given streams (default: all) afresh at frame 0."""
        ...

    def end(self, streams: list[int] | None = None) -> None:
        """End the given streams at their current position: later frames count as offline
        padding, and their last ``lookahead_frames`` rows come out over the next steps."""
        ...

    def pending_after_end(self, stream: int = 0) -> int:
        """Frames an ended stream still needs stepped (any values) to complete its output."""
        ...


class _StreamStepper:
    """What both stream-backed steppers share: stream control delegated to the wrapped
    ModelStream/OnnxStream (same API), and how many padding frames an ended stream still needs."""

    stream: object

    def reset(self, streams=None) -> None:
        self.stream.reset(streams)

    def end(self, streams=None) -> None:
        self.stream.end(streams)

    def pending_after_end(self, stream: int = 0) -> int:
        s = self.stream
        return s.plan.pending_after_end(int(s.positions[stream]), int(s.ends[stream]))


class TorchStepper(_StreamStepper):
    """ModelStream behind the stepper interface: raw log-mel (B, n, F) numpy -> numpy outputs."""

    def __init__(self, model, config: DetectorConfig, batch_size: int = 1, device: str = "cpu",
                 max_step_frames: int = 64, precision: str = "fp32"):
        from rtsed.stream.model_stream import ModelStream

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device is visible to torch; use --device cpu")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        norm = config.normalization or NormalizationStats.identity(config.model.n_mels)
        self.mean = torch.tensor(norm.mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(norm.std, dtype=torch.float32, device=self.device)
        self.stream = ModelStream(self.model, batch_size=batch_size, max_step_frames=max_step_frames,
                                  precision=precision)
        self.lookahead_frames = self.stream.lookahead_frames
        self.batch_size = batch_size

    @torch.no_grad()
    def step(self, logmel: np.ndarray, hold: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = (torch.from_numpy(logmel).to(self.device) - self.mean) / self.std
        out = self.stream.step(x, hold)
        return torch.sigmoid(out.logits).cpu().numpy(), out.frame_index.numpy(), out.valid.numpy()


class OnnxStepper(_StreamStepper):
    """OnnxStream behind the stepper interface (the graph normalises inside)."""

    def __init__(self, onnx_path: str | Path, batch_size: int = 1, device: str = "cpu", threads: int | None = 1):
        from rtsed.stream.onnx_runtime import OnnxStream

        self.stream = OnnxStream(onnx_path, batch_size=batch_size, device=device, threads=threads)
        self.lookahead_frames = self.stream.lookahead_frames
        self.batch_size = batch_size

    def step(self, logmel: np.ndarray, hold: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.stream.step(logmel, hold)
        return 1.0 / (1.0 + np.exp(-out.logits)), out.frame_index, out.valid


def make_stepper(model_path: str | Path, backend: str = "torch", device: str = "cpu", batch_size: int = 1,
                 threads: int | None = None, precision: str = "fp32"):
    """(stepper, config, model or None) for a checkpoint (.pt) or an exported step graph (.onnx).
    The onnx backend on a checkpoint exports its step graph once to a cache folder. ``precision``
    "bf16": the torch backend's GEMMs in bf16 on the CPU (rtsed.backends.precision)."""
    from rtsed.models.checkpoint import load_checkpoint
    from rtsed.backends.precision import check_precision

    path = Path(model_path)
    if backend not in ("torch", "onnx"):
        raise ValueError(f"--backend {backend!r}: use torch or onnx")
    check_precision(precision, device, backend)
    if path.suffix == ".onnx":
        if backend != "onnx":
            raise ValueError(f"{path} is an ONNX file: use --backend onnx (or pass the .pt checkpoint)")
        stepper = OnnxStepper(path, batch_size, device, threads)
        return stepper, stepper.stream.config, None
    ckpt = load_checkpoint(path)
    if backend == "torch":
        if threads is not None:
            torch.set_num_threads(threads)
        return (TorchStepper(ckpt.model, ckpt.config, batch_size, device, precision=precision), ckpt.config,
                ckpt.model)
    onnx_path = exported_step_graph(path, ckpt)
    return OnnxStepper(onnx_path, batch_size, device, threads), ckpt.config, ckpt.model


def exported_step_graph(checkpoint_path: Path, ckpt) -> Path:
    """The checkpoint's step graph, exported once per checkpoint content and graph revision into
    ~/.cache/rtsed/onnx."""
    import hashlib
    import os

    from rtsed.stream.onnx_export import STEP_GRAPH_REVISION, export_onnx

    digest = hashlib.sha1(checkpoint_path.read_bytes()).hexdigest()[:16]
    folder = Path(os.environ.get("RTSED_ONNX_CACHE", Path.home() / ".cache/rtsed/onnx"))
    target = folder / f"{checkpoint_path.stem}-{digest}-step-r{STEP_GRAPH_REVISION}.onnx"
    if not target.exists():
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        export_onnx(ckpt.model, ckpt.config, tmp, streaming=True)
        os.replace(tmp, target)
    return target
