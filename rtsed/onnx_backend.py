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


_F32 = np.dtype(np.float32)


def _runner(session, device: str):
    """``session.run`` as a callable (output_names, feeds) -> outputs. On the CPU, the binding
    under it (``session._sess.run``) when this onnxruntime has one: InferenceSession.run checks
    its feeds against the graph's inputs in Python first, ~3.8 us of a ~160 us one-frame
    dnd_7_10 step, and OnnxStream checks them itself. On CUDA the public run, whose EP-failure
    fallback the binding lacks."""
    raw = getattr(session, "_sess", None)
    if device == "cpu" and callable(getattr(raw, "run", None)):
        return lambda names, feeds: raw.run(names, feeds, None)
    return session.run


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


class OnnxStepOutput:
    """As rtsed.streaming.StepOutput, numpy: logits (B, n, C), frame_index (B, n), valid (B, n).

    A steady-state step (every stream past its lookahead, none ended) leaves frame_index and valid
    to be computed on first use, from the positions before the step: every row is then valid and
    row j of stream b is frame positions[b] + j - lookahead. ``push`` reads neither."""

    __slots__ = ("logits", "_frame_index", "_valid", "_first", "_lookahead")

    def __init__(self, logits: np.ndarray, frame_index: np.ndarray | None = None,
                 valid: np.ndarray | None = None, first: np.ndarray | None = None, lookahead: int = 0):
        self.logits, self._frame_index, self._valid = logits, frame_index, valid
        self._first, self._lookahead = first, lookahead

    @property
    def frame_index(self) -> np.ndarray:
        if self._frame_index is None:
            self._frame_index = self._first[:, None] + (np.arange(self.logits.shape[1]) - self._lookahead)
        return self._frame_index

    @property
    def valid(self) -> np.ndarray:
        if self._valid is None:
            self._valid = np.ones(self.logits.shape[:2], bool)
        return self._valid


class OnnxStream:
    """Streaming through a step graph, B independent streams (the ModelStream API).

    A step graph exported with a steady-state branch (``If`` on position and end, see
    rtsed.export) also gets that branch as a session of its own, run directly whenever every
    stream is past its lookahead and none has ended: the same arithmetic without the If node,
    whose subgraph call cost ~7 us of a ~170 us one-frame step. That session computes only the
    logits and the new states (``steady_step_model(..., outputs=...)``): positions, frame indices
    and validity are then known without the graph (positions in numpy, frame_index/valid only
    when read), which takes 11 nodes (Sigmoid, the index arithmetic) off it. Measured on
    dnd_7_10, one thread, one frame per push: 179 -> 166 us for this and a leaner step() (the
    old one spent ~11 us of Python around the run: two numpy reductions per step to choose the
    session, a 9-entry feed dict, 8 outputs), then -3.8 us for the binding's run (``_runner``)
    and ~-3 us for push's own steady path. Numpy states between calls, not IOBinding or
    run_with_ort_values: both measured slower here (+23 us, +40 us per one-frame step)."""

    def __init__(self, path: str | Path, batch_size: int = 1, device: str = "cpu", threads: int | None = None):
        self.file = OnnxFile.open(path, device, threads)
        if self.file.graph != "step":
            raise OnnxModelError(f"{path}: an offline graph; streaming needs one exported with --streaming")
        self.config = self.file.config
        self._n_mels = self.config.model.n_mels
        self.batch_size = batch_size
        self.lookahead_frames = self.file.lookahead_frames
        self.no_end = int(self.file.meta["rtsed_no_end"])
        self.state_specs = [(s["name"], tuple(batch_size if d == "batch" else d for d in s["shape"]))
                            for s in json.loads(self.file.meta["rtsed_state"])]
        self._state_names = [name for name, _ in self.state_specs]
        self.states = {name: np.zeros(shape, np.float32) for name, shape in self.state_specs}
        self.positions = np.zeros(batch_size, np.int64)
        self.ends = np.full(batch_size, self.no_end, np.int64)
        self._outputs = ["logits", "frame_index", "valid", "position_out", *[f"{n}_out" for n in self._state_names]]
        self._steady_outputs = ["logits", *[f"{n}_out" for n in self._state_names]]
        self._steady_session = None
        if self.file.meta.get("rtsed_step_variants") == "steady-if":
            import onnx

            steady = steady_step_model(onnx.load(str(self.file.path)), self._steady_outputs)
            self._steady_session = _session(self.file.path, device, threads, steady.SerializeToString())
            self._run_steady = _runner(self._steady_session, device)
        self._run = _runner(self.file.session, device)
        # None: not known, look at positions and ends before the next step. True stays true
        # until reset() or end(): positions only grow.
        self._steady: bool | None = None

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
        self._steady = None

    def end(self, streams=None) -> None:
        idx = slice(None) if streams is None else np.asarray(streams, dtype=np.int64)
        self.ends[idx] = np.minimum(self.ends[idx], self.positions[idx])
        self._steady = None

    def _is_steady(self) -> bool:
        """Whether the steady session may run this step: every stream past its lookahead, none ended."""
        self._steady = bool(self._steady_session is not None and self.positions.min() >= self.lookahead_frames
                            and self.ends.min() >= self.no_end)
        return self._steady

    def step(self, frames: np.ndarray) -> OnnxStepOutput:
        """frames (B, n, F) raw log-mel -> OnnxStepOutput."""
        x = frames
        if type(x) is not np.ndarray or x.dtype is not _F32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 3 or x.shape[0] != self.batch_size or x.shape[2] != self._n_mels:
            raise OnnxModelError(f"step expects (batch={self.batch_size}, frames, {self._n_mels}); got {x.shape}")
        if self._steady or (self._steady is None and self._is_steady()):
            logits, first = self._steady_step(x)
            return OnnxStepOutput(logits, first=first, lookahead=self.lookahead_frames)
        feeds = {"frames": x, "position": self.positions, "end": self.ends, **self.states}
        logits, frame_index, valid, self.positions, *new_states = self._run(self._outputs, feeds)
        # The graph's outputs are fresh arrays: they become the states, no copy.
        self.states = dict(zip(self._state_names, new_states))
        self._steady = None  # the lookahead may have filled with this step
        return OnnxStepOutput(logits, frame_index, valid)

    def _steady_step(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A checked (B, n, F) float32 batch through the steady session -> (logits (B, n, C),
        positions before the step (B,)). Every row is then a valid new frame."""
        feeds = self.states.copy()
        feeds["frames"] = x
        logits, *new_states = self._run_steady(self._steady_outputs, feeds)
        self.states = dict(zip(self._state_names, new_states))
        first = self.positions
        self.positions = first + x.shape[1]  # a new array: ``first`` stays the step's own
        return logits, first

    def push(self, frames: np.ndarray) -> np.ndarray:
        """One stream: frames (n, F) -> logits (m, C) of the newly completed output frames."""
        if self.batch_size != 1:
            raise RuntimeError("push/flush serve one stream; with several use step/end/reset")
        x = np.ascontiguousarray(frames, dtype=np.float32)
        n = x.shape[0]
        if n == 0:
            return np.zeros((0, len(self.config.labels)), np.float32)
        if x.ndim == 2 and x.shape[1] == self._n_mels and (self._steady or (self._steady is None and self._is_steady())):
            # Every row is a new frame: no step output object, no bounds (~3 us of Python per
            # one-frame push, measured, which runs slower right after onnxruntime's run).
            return self._steady_step(x[None])[0][0]
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
