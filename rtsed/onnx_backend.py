"""Running rtsed ONNX files with onnxruntime: offline graphs and streaming step graphs.

``OnnxStream`` mirrors ``rtsed.streaming.ModelStream`` (step / push / flush / end / reset over B
streams), holding the state tensors as numpy arrays between calls. Providers: CPU by default,
CUDA where onnxruntime-gpu and a GPU exist (``device="cuda"``; asking for it elsewhere is an error).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtsed.config import DetectorConfig
from rtsed.export import ONNX_FORMAT, ONNX_FORMAT_VERSION, steady_step_model


class OnnxModelError(ValueError):
    """An ONNX file or state that this rtsed cannot run; the message names the file and fix."""


def _session(path: Path, device: str, threads: int | None, model: bytes | None = None):
    """An onnxruntime session for the file at ``path`` (or for ``model``, serialized, named
    after ``path`` in errors)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("the onnx backend needs onnxruntime: pip install 'rtsed[cpu]' "
                          "(or 'rtsed[gpu]' on a CUDA machine; never both)") from exc
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise OnnxModelError(f"--device cuda with the onnx backend needs onnxruntime-gpu and a GPU; "
                                 f"this onnxruntime offers {ort.get_available_providers()}")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif device == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        raise OnnxModelError(f"unknown device {device!r}: use cpu or cuda")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(model if model is not None else str(path), sess_options=options,
                                    providers=providers)
    except Exception as exc:
        raise OnnxModelError(f"{path}: onnxruntime cannot load it ({exc})") from None


@dataclass
class OnnxFile:
    """An opened rtsed ONNX file: session, config and graph kind from its metadata."""

    path: Path
    session: object
    config: DetectorConfig
    graph: str
    lookahead_frames: int
    meta: dict[str, str]

    @classmethod
    def open(cls, path: str | Path, device: str = "cpu", threads: int | None = None) -> "OnnxFile":
        path = Path(path)
        if not path.is_file():
            raise OnnxModelError(f"{path}: no such ONNX file")
        session = _session(path, device, threads)
        meta = dict(session.get_modelmeta().custom_metadata_map)
        if meta.get("rtsed_format") != ONNX_FORMAT:
            raise OnnxModelError(f"{path}: not an rtsed ONNX file (no rtsed metadata); export one with "
                                 "python -m rtsed.export")
        version = meta.get("rtsed_format_version")
        if version != str(ONNX_FORMAT_VERSION):
            raise OnnxModelError(f"{path}: rtsed ONNX format version {version}, this rtsed reads "
                                 f"version {ONNX_FORMAT_VERSION}; re-export it with this rtsed")
        config = DetectorConfig.from_dict(json.loads(meta["rtsed_config"]))
        return cls(path, session, config, meta["rtsed_graph"], int(meta["rtsed_lookahead_frames"]), meta)


class OnnxOffline:
    """Offline graph: logits for whole log-mel sequences."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None):
        self.file = OnnxFile.open(path, device, threads)
        if self.file.graph != "offline":
            raise OnnxModelError(f"{path}: a {self.file.graph} graph; offline use needs one exported without --streaming")
        self.config = self.file.config

    def logits(self, logmel: np.ndarray) -> np.ndarray:
        """logmel (B, T, F) raw log-mel (normalised inside) -> logits (B, T, C)."""
        x = np.ascontiguousarray(logmel, dtype=np.float32)
        if x.ndim != 3 or x.shape[2] != self.config.model.n_mels:
            raise OnnxModelError(f"expected log-mel (batch, frames, {self.config.model.n_mels}); got {x.shape}")
        return self.file.session.run(["logits"], {"logmel": x})[0]


@dataclass
class OnnxStepOutput:
    """As rtsed.streaming.StepOutput, numpy: logits (B, n, C), frame_index (B, n), valid (B, n)."""

    logits: np.ndarray
    frame_index: np.ndarray
    valid: np.ndarray


class OnnxStream:
    """Streaming through a step graph, B independent streams (the ModelStream API).

    A step graph exported with a steady-state branch (``If`` on position and end, see
    rtsed.export) also gets that branch as a session of its own, run directly whenever every
    stream is past its lookahead and none has ended: the same arithmetic without the If node,
    whose subgraph call cost ~7 us of a ~170 us one-frame step."""

    def __init__(self, path: str | Path, batch_size: int = 1, device: str = "cpu", threads: int | None = None):
        self.file = OnnxFile.open(path, device, threads)
        if self.file.graph != "step":
            raise OnnxModelError(f"{path}: an offline graph; streaming needs one exported with --streaming")
        self._steady_session = None
        if self.file.meta.get("rtsed_step_variants") == "steady-if":
            import onnx

            steady = steady_step_model(onnx.load(str(self.file.path)))
            self._steady_session = _session(self.file.path, device, threads, steady.SerializeToString())
        self.config = self.file.config
        self.batch_size = batch_size
        self.lookahead_frames = self.file.lookahead_frames
        self.no_end = int(self.file.meta["rtsed_no_end"])
        self.state_specs = [(s["name"], tuple(batch_size if d == "batch" else d for d in s["shape"]))
                            for s in json.loads(self.file.meta["rtsed_state"])]
        self.states = {name: np.zeros(shape, np.float32) for name, shape in self.state_specs}
        self.positions = np.zeros(batch_size, np.int64)
        self.ends = np.full(batch_size, self.no_end, np.int64)
        self._outputs = ["logits", "frame_index", "valid", "position_out", *[f"{n}_out" for n, _ in self.state_specs]]
        self._state_names = [name for name, _ in self.state_specs]

    def load_states(self, states: dict[str, np.ndarray]) -> None:
        """Replace the state tensors (e.g. restored from elsewhere), checking names and shapes."""
        expected = dict(self.state_specs)
        unknown = sorted(set(states) - set(expected))
        if unknown:
            raise OnnxModelError(f"{self.file.path}: unknown state tensor(s) {unknown}; this graph has {sorted(expected)}")
        for name, value in states.items():
            if tuple(value.shape) != expected[name]:
                raise OnnxModelError(f"{self.file.path}: state {name!r} has shape {tuple(value.shape)}, "
                                     f"the graph needs {expected[name]} (batch size {self.batch_size})")
            self.states[name] = np.ascontiguousarray(value, dtype=np.float32)

    def reset(self, streams=None) -> None:
        idx = slice(None) if streams is None else np.asarray(streams, dtype=np.int64)
        for name, _ in self.state_specs:
            axis = 1 if name == "gru_h" else 0
            view = np.moveaxis(self.states[name], axis, 0)
            view[idx] = 0.0
        self.positions[idx] = 0
        self.ends[idx] = self.no_end

    def end(self, streams=None) -> None:
        idx = slice(None) if streams is None else np.asarray(streams, dtype=np.int64)
        self.ends[idx] = np.minimum(self.ends[idx], self.positions[idx])

    def step(self, frames: np.ndarray) -> OnnxStepOutput:
        """frames (B, n, F) raw log-mel -> OnnxStepOutput."""
        x = np.ascontiguousarray(frames, dtype=np.float32)
        if x.ndim != 3 or x.shape[0] != self.batch_size or x.shape[2] != self.config.model.n_mels:
            raise OnnxModelError(f"step expects (batch={self.batch_size}, frames, {self.config.model.n_mels}); got {x.shape}")
        session = self.file.session
        if (self._steady_session is not None and self.positions.min() >= self.lookahead_frames
                and self.ends.min() >= self.no_end):
            session = self._steady_session
        feeds = {"frames": x, "position": self.positions, "end": self.ends, **self.states}
        logits, frame_index, valid, self.positions, *new_states = session.run(self._outputs, feeds)
        # The graph's outputs are fresh arrays: they become the states, no copy.
        self.states = dict(zip(self._state_names, new_states))
        return OnnxStepOutput(logits, frame_index, valid)

    def push(self, frames: np.ndarray) -> np.ndarray:
        """One stream: frames (n, F) -> logits (m, C) of the newly completed output frames."""
        if self.batch_size != 1:
            raise RuntimeError("push/flush serve one stream; with several use step/end/reset")
        x = np.asarray(frames, dtype=np.float32)
        n = x.shape[0]
        if n == 0:
            return np.zeros((0, len(self.config.labels)), np.float32)
        position, end = int(self.positions[0]), int(self.ends[0])
        logits = self.step(x[None]).logits
        # Row j is offline frame position + j - lookahead: valid from frame 0 up to the end.
        lo = min(n, max(0, self.lookahead_frames - position))
        hi = max(lo, min(n, end + self.lookahead_frames - position))
        return logits[0, lo:hi]

    def flush(self) -> np.ndarray:
        """One stream: end it and return its last lookahead frames' logits."""
        self.end()
        pending = int(self.ends[0] + self.lookahead_frames - self.positions[0])
        if pending <= 0:
            return np.zeros((0, len(self.config.labels)), np.float32)
        return self.push(np.zeros((pending, self.config.model.n_mels), np.float32))


def check_against_torch(path: str | Path, model, frames: int = 160, seed: int = 0) -> float:
    """Max |logit difference| between the ONNX file and the torch model on random log-mel
    (offline: one pass; step graph: streamed in chunks of 1..9 frames, then flushed)."""
    import torch

    f = OnnxFile.open(path)
    rng = np.random.default_rng(seed)
    norm = f.config.normalization
    mean = np.asarray(norm.mean if norm else 0.0, np.float32)
    std = np.asarray(norm.std if norm else 1.0, np.float32)
    logmel = (rng.standard_normal((1, frames, f.config.model.n_mels)).astype(np.float32) * std + mean)
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy((logmel - mean) / std)).numpy()[0]
    if f.graph == "offline":
        got = OnnxOffline(path).logits(logmel)[0]
    else:
        stream, parts, start = OnnxStream(path), [], 0
        while start < frames:
            size = int(rng.integers(1, 10))
            parts.append(stream.push(logmel[0, start:start + size]))
            start += size
        parts.append(stream.flush())
        got = np.concatenate(parts)
    return float(np.abs(got - ref).max())
