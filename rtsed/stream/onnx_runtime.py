"""Running rtsed ONNX files with onnxruntime: offline graphs and streaming step graphs.

``OnnxStream`` mirrors ``rtsed.stream.model_stream.ModelStream`` (step / push / flush / end / reset over B
streams), holding the state tensors as numpy arrays between calls on the CPU and as OrtValues on the
device on CUDA (IO binding). Providers: CPU by default, CUDA where onnxruntime-gpu and a GPU exist
(``device="cuda"``; asking for it elsewhere, or a session that quietly fell back to the CPU, is an error).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtsed.config import DetectorConfig
from rtsed.models.integrity import MAX_ABS_WEIGHT, absurd_message, modified_message
from rtsed.stream.plan import NO_END, StreamPlan
from rtsed.stream.onnx_export import (DIL_NEW, DIL_READ, DIL_TAPS, DIL_WRITE, ONNX_FORMAT, ONNX_FORMAT_VERSION,
                                      float_weights, graph_digest, inline_shared_weights, steady_step_model,
                                      window_name)

log = logging.getLogger(__name__)


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
        session = ort.InferenceSession(model if model is not None else str(path), sess_options=options,
                                       providers=providers)
    except Exception as exc:
        raise OnnxModelError(f"{path}: onnxruntime cannot load it ({exc})") from None
    check_providers(session, providers, path)
    return session


def check_providers(session, requested: list[str], path: Path) -> None:
    """OnnxModelError when the session runs without a provider it was asked for: onnxruntime-gpu
    that cannot load its CUDA or cuDNN libraries logs an error and quietly builds a CPU session,
    so a CUDA request is checked on the session itself, not on what the wheel offers."""
    missing = [p for p in requested if p not in session.get_providers()]
    if missing:
        raise OnnxModelError(
            f"{path}: onnxruntime was asked for {missing} but the session runs on {session.get_providers()}: "
            "onnxruntime-gpu could not load the CUDA/cuDNN libraries it was built for (its log above names "
            "the missing one). Install the CUDA runtime and cuDNN that this onnxruntime-gpu version needs "
            "(onnxruntime.ai's CUDA requirements table), or run on the CPU (--device cpu).")


_F32 = np.dtype(np.float32)
_WARNED_NO_VNNI: set[Path] = set()  # the no-VNNI note is said once per file


def _runner(session, device: str):
    """``session.run`` as a callable (output_names, feeds) -> outputs. On the CPU, the binding
    under it (``session._sess.run``) when this onnxruntime has one: InferenceSession.run checks
    its feeds against the graph's inputs in Python first, a visible share of a one-frame step,
    and OnnxStream checks them itself. On CUDA the public run, whose EP-failure fallback the
    binding lacks."""
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
    # The graph as the session runs it (shared weights copied back into the branches that read
    # them: rtsed.stream.onnx_export.inline_shared_weights); None without the onnx package.
    proto: object = None

    @classmethod
    def open(cls, path: str | Path, device: str = "cpu", threads: int | None = None) -> "OnnxFile":
        path = Path(path)
        if not path.is_file():
            raise OnnxModelError(f"{path}: no such ONNX file")
        stored = _load_proto(path)
        runnable = None if stored is None else inline_shared_weights(stored)
        session = _session(path, device, threads, None if runnable is stored else runnable.SerializeToString())
        meta = dict(session.get_modelmeta().custom_metadata_map)
        if meta.get("rtsed_format") != ONNX_FORMAT:
            raise OnnxModelError(f"{path}: not an rtsed ONNX file (no rtsed metadata); export one with "
                                 "python -m rtsed.export")
        version = meta.get("rtsed_format_version")
        if version != str(ONNX_FORMAT_VERSION):
            raise OnnxModelError(f"{path}: rtsed ONNX format version {version}, this rtsed reads "
                                 f"version {ONNX_FORMAT_VERSION}; re-export it with this rtsed")
        _check_weights(path, meta.get("rtsed_content_sha256"), stored)
        config = DetectorConfig.from_dict(json.loads(meta["rtsed_config"]))
        opened = cls(path, session, config, meta["rtsed_graph"], int(meta["rtsed_lookahead_frames"]), meta, runnable)
        if opened.precision == "int8" and device == "cpu":
            from rtsed.backends.precision import cpu_int8_dot, int8_note

            if cpu_int8_dot() is None and path not in _WARNED_NO_VNNI:
                _WARNED_NO_VNNI.add(path)
                log.warning("%s: int8 graph on a CPU with %s", path, int8_note())
        return opened

    @property
    def precision(self) -> str:
        """"int8" for a graph from ``rtsed.export --quantize int8``, else "fp32"."""
        return self.meta.get("rtsed_precision", "fp32")


def _load_proto(path: Path):
    """The file's ModelProto, or None where the onnx package is missing (onnxruntime alone runs
    the file as stored, shared weights as outer-scope values, more slowly) or cannot parse it
    (onnxruntime then says why)."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        return onnx.load(str(path))
    except Exception:  # noqa: BLE001 - the session that follows reports the file's problem
        return None


def _check_weights(path: Path, digest: str | None, proto) -> None:
    """OnnxModelError when the graph (``proto``, as stored) no longer matches the content hash
    written at export, or holds non-finite or absurdly large weights (rtsed.models.integrity).
    Files exported before the hash existed are checked for magnitudes only."""
    if proto is None:  # onnxruntime alone runs the file; the check needs the onnx package
        log.info("%s: not checked against its content hash (pip install onnx to check it)", path)
        return
    if digest is None:
        log.info("%s: exported without a content hash (an older rtsed); loaded unchecked", path)
    elif graph_digest(proto) != digest:
        raise OnnxModelError(modified_message(path, "ONNX file"))
    worst = []
    for name, w in float_weights(proto):
        if w.size and not np.isfinite(w).all():
            raise OnnxModelError(f"{path}: non-finite (NaN/Inf) weights in {name}; the file is corrupt: "
                                 "re-download or re-export it")
        if w.size and float(np.abs(w).max()) > MAX_ABS_WEIGHT:
            worst.append((name, float(np.abs(w).max())))
    if worst:
        raise OnnxModelError(absurd_message(path, worst))


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
    """As rtsed.stream.model_stream.StepOutput, numpy: logits (B, n, C), frame_index (B, n), valid (B, n).

    A steady-state step (every stream past its lookahead, none ended) leaves frame_index and valid
    to be computed on first use, from the positions before the step: every row is then valid and
    row j of stream b is frame positions[b] + j - lookahead. ``push`` reads neither."""

    __slots__ = ("logits", "_frame_index", "_valid", "_first", "_plan")

    def __init__(self, logits: np.ndarray, frame_index: np.ndarray | None = None,
                 valid: np.ndarray | None = None, first: np.ndarray | None = None, plan: StreamPlan | None = None):
        self.logits, self._frame_index, self._valid = logits, frame_index, valid
        self._first, self._plan = first, plan

    @property
    def frame_index(self) -> np.ndarray:
        if self._frame_index is None:
            first = self._first  # an int for one stream's one-frame step (no array made per step)
            first = np.array([first], np.int64) if type(first) is int else first
            self._frame_index = self._plan.frame_index(first, np.arange(self.logits.shape[1]))
        return self._frame_index

    @property
    def valid(self) -> np.ndarray:
        if self._valid is None:
            self._valid = np.ones(self.logits.shape[:2], bool)
        return self._valid


class OnnxStream:
    """Streaming through a step graph, B independent streams (the ModelStream API).

    A step graph exported with a steady-state branch (``If`` on position and end, see
    rtsed.stream.onnx_export) also gets that branch as a session of its own, run directly
    whenever every stream is past its lookahead and none has ended: the same arithmetic without
    the If node's subgraph call. That session computes only the logits and the new states
    (``steady_step_model(..., outputs=...)``): positions, frame indices and validity are then
    known without the graph (positions in numpy, frame_index/valid only when read), which takes
    the Sigmoid and the index arithmetic off it. At one frame per step the Python around the run
    is a large share of the time, hence the lean ``step`` and ``push``. On the CPU states stay numpy
    arrays between calls (IOBinding and run_with_ort_values were both slower there); on CUDA they
    stay on the device as OrtValues (``io_binding``, see ``_bound_step``).

    With f_dil (``steady-if-1`` files) a steady one-frame step runs a third session, the steady
    branch's one-frame variant: it reads f_dil's K - 1 past taps from the ``dil_history`` ring
    (their rows fed as ``dil_taps``, from a table by position mod R for one stream) and returns
    only the new f_dil frame, which this class writes into ring row position mod R in place: the
    (K - 1) d-frame history is never copied in or out of onnxruntime. It returns the CNN blocks'
    windows (history + new frame) rather than their next histories, which are then views of the
    windows (one stream), saving a Slice per block. The ring is written in place: an array taken
    from ``states`` changes with later steps. Measured effects: benchmarks/README.md."""

    _device_states: dict | None = None  # the states as OrtValues on the session's device, when bound

    def __init__(self, path: str | Path, batch_size: int = 1, device: str = "cpu", threads: int | None = None,
                 io_binding: bool | None = None):
        self.file = OnnxFile.open(path, device, threads)
        # IO binding keeps the state tensors on the session's device between steps (OrtValues
        # bound as the next step's inputs): on CUDA that saves two host-device copies of every
        # state per step. On the CPU the plain numpy run is faster, so it is on by default only on
        # CUDA (True forces it anywhere; it then runs the full step graph, never the steady ones).
        self._bound = device == "cuda" if io_binding is None else bool(io_binding)
        self._ort_device = "cuda" if device == "cuda" else "cpu"
        self._binding = self.file.session.io_binding() if self._bound else None
        if self.file.graph != "step":
            raise OnnxModelError(f"{path}: an offline graph; streaming needs one exported with --streaming")
        self.config = self.file.config
        self._n_mels = self.config.model.n_mels
        self.batch_size = batch_size
        self.lookahead_frames = self.file.lookahead_frames
        self.no_end = int(self.file.meta["rtsed_no_end"])
        if self.no_end != NO_END:
            raise OnnxModelError(f"{path}: exported with end marker {self.no_end}, this rtsed uses {NO_END}: "
                                 "export it again")
        self.plan = StreamPlan((), self.lookahead_frames)  # (the CNN's delays are inside the graph)
        self.state_specs = [(s["name"], tuple(batch_size if d == "batch" else d for d in s["shape"]))
                            for s in json.loads(self.file.meta["rtsed_state"])]
        self._batch_axes = {s["name"]: s["shape"].index("batch") for s in json.loads(self.file.meta["rtsed_state"])}
        self._state_names = [name for name, _ in self.state_specs]
        self.states = {name: np.zeros(shape, np.float32) for name, shape in self.state_specs}
        self._positions = np.zeros(batch_size, np.int64)
        # Frames pushed through the steady path and not yet added to _positions (see positions).
        self._advance = 0
        self.ends = np.full(batch_size, self.no_end, np.int64)
        self._outputs = ["logits", "frame_index", "valid", "position_out", *[f"{n}_out" for n in self._state_names]]
        self._steady_outputs = ["logits", *[f"{n}_out" for n in self._state_names]]
        self._steady_session = self._one_frame_session = None
        variants = None if self._bound else self.file.meta.get("rtsed_step_variants")
        if variants in ("steady-if", "steady-if-1"):
            import onnx

            proto = self.file.proto if self.file.proto is not None else onnx.load(str(self.file.path))
            specs = {s["name"]: s for s in json.loads(self.file.meta["rtsed_state"])}
            if variants == "steady-if-1":
                # The one-frame session returns the CNN blocks' windows (history + new frame)
                # instead of their next histories, which are then views of the windows' last
                # K - 1 frames (contiguous for one stream), saving a Slice per block. Not the
                # n-frame one: its windows are n + K - 1 frames long, and returning them was slower.
                self._next_history = {}  # state name -> index of its window's last K - 1 frames
                for name in self._state_names:
                    if name != "dil_history":
                        axis = specs[name]["time_axis"]
                        self._next_history[name] = (slice(None),) * axis + (slice(-specs[name]["shape"][axis], None),)
            steady = steady_step_model(proto, self._steady_outputs)
            self._steady_session = _session(self.file.path, device, threads, steady.SerializeToString())
            self._run_steady = _runner(self._steady_session, device)
            # The n-frame steady step reads and writes the dil_history ring at rows given by
            # the positions (steady-if-1): fed, see _ring_indices.
            self._steady_ring = DIL_READ in {i.name for i in self._steady_session.get_inputs()}
            if variants == "steady-if-1":
                rows, taps = specs["dil_history"]["shape"][1], np.asarray(specs["dil_history"]["taps"], np.int64)
                self._one_frame_names = [n for n in self._state_names if n != "dil_history"]
                self._one_frame_outputs = ["logits", *[window_name(n) for n in self._one_frame_names], DIL_NEW]
                one = steady_step_model(proto, self._one_frame_outputs, one_frame=True)
                self._one_frame_session = _session(self.file.path, device, threads, one.SerializeToString())
                self._run_one_frame = _runner(self._one_frame_session, device)
                self._ring_rows, self._ring_taps = rows, taps
                self._ring_base = (np.arange(batch_size, dtype=np.int64) * rows)[:, None]
                # One stream: the tap rows of every position mod R, looked up instead of computed
                # (each numpy op is slow right after onnxruntime's run).
                self._tap_table = [(p + taps[None, None]) % rows for p in range(rows)]
                self._ring_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._run = _runner(self.file.session, device)
        # None: not known, look at positions and ends before the next step. True stays true
        # until reset() or end(): positions only grow.
        self._steady: bool | None = None

    @property
    def states(self) -> dict[str, np.ndarray]:
        """The state tensors by name, numpy on the host. With IO binding the first read after a
        step copies them off the device (and later steps put them back there): reading them each
        step costs the copies binding saves."""
        if self._device_states is not None:
            self._host_states = {name: np.array(value.numpy(), order="C") for name, value in self._device_states.items()}
            self._device_states = None
        return self._host_states

    @states.setter
    def states(self, value: dict[str, np.ndarray]) -> None:
        self._host_states, self._device_states = value, None

    @property
    def positions(self) -> np.ndarray:
        """(B,) int64: frames each stream has consumed, its next frame's stream position.

        A steady one-stream ``push`` only counts its frames in a Python int, added here on the
        first read: a numpy allocation after every run is costly at one frame per push (numpy runs
        slowly right after onnxruntime's run). The sum is a new array, so a step output's
        ``first`` (an earlier positions array) keeps its values."""
        if self._advance:
            self._positions = self._positions + self._advance
            self._advance = 0
        return self._positions

    @positions.setter
    def positions(self, value: np.ndarray) -> None:
        self._positions, self._advance = value, 0

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
            # A copy: the one-frame steady step writes into dil_history in place.
            self.states[name] = np.array(value, dtype=np.float32, order="C")

    def reset(self, streams=None) -> None:
        idx = slice(None) if streams is None else np.asarray(streams, dtype=np.int64)
        for name, _ in self.state_specs:
            view = np.moveaxis(self.states[name], self._batch_axes[name], 0)
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
        self._steady = self._steady_session is not None and self.plan.steady(self.positions, self.ends)
        return self._steady

    def step(self, frames: np.ndarray, hold=None) -> OnnxStepOutput:
        """frames (B, n, F) raw log-mel -> OnnxStepOutput.

        hold: (B,) bool, streams that sit this step out (as ``ModelStream.step``): their state
        tensors, position and end are put back after the step, and their rows come back invalid.
        The f_dil ring is indexed by each stream's own position, so its rows need no rotation."""
        if hold is not None and np.any(hold):
            held = np.flatnonzero(np.asarray(hold, dtype=bool))
            saved = {name: np.take(value, held, axis=self._batch_axes[name]).copy()
                     for name, value in self.states.items()}
            positions, ends = self.positions[held].copy(), self.ends[held].copy()
            out = self.step(frames)
            for name, value in saved.items():
                state = self.states[name]
                if not state.flags.writeable:
                    state = self.states[name] = state.copy()
                np.moveaxis(state, self._batch_axes[name], 0)[held] = np.moveaxis(value, self._batch_axes[name], 0)
            restored = self.positions.copy()  # a new array: the step output's ``first`` keeps its values
            restored[held] = positions
            self.positions = restored
            self.ends[held] = ends
            valid = out.valid.copy()
            valid[held] = False
            return OnnxStepOutput(out.logits, out.frame_index, valid)
        x = frames
        if type(x) is not np.ndarray or x.dtype is not _F32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 3 or x.shape[0] != self.batch_size or x.shape[2] != self._n_mels:
            raise OnnxModelError(f"step expects (batch={self.batch_size}, frames, {self._n_mels}); got {x.shape}")
        if self._steady or (self._steady is None and self._is_steady()):
            if x.shape[1] == 1 and self._one_frame_session is not None:
                if self.batch_size == 1:
                    # As push: the table of tap rows, an int slot and the position counted in an
                    # int (see positions); each numpy op around the run is a visible share of a
                    # one-frame step.
                    position = int(self._positions[0]) + self._advance
                    slot = position % self._ring_rows
                    logits = self._one_frame_step(x, self._tap_table[slot], slot)
                    self._advance += 1
                    return OnnxStepOutput(logits, first=position, plan=self.plan)
                first = self.positions
                slots = first % self._ring_rows
                taps = self._ring_base + (slots[:, None] + self._ring_taps) % self._ring_rows
                logits = self._one_frame_step(x, taps[:, None], slots)
                self.positions = first + 1
            else:
                logits, first = self._steady_step(x)
            return OnnxStepOutput(logits, first=first, plan=self.plan)
        if self._bound:
            return self._bound_step(x)
        feeds = {"frames": x, "position": self.positions, "end": self.ends, **self.states}
        logits, frame_index, valid, self.positions, *new_states = self._run(self._outputs, feeds)
        # The graph's outputs are fresh arrays: they become the states, no copy.
        self.states = dict(zip(self._state_names, new_states))
        self._steady = None  # the lookahead may have filled with this step
        return OnnxStepOutput(logits, frame_index, valid)

    def _bound_step(self, x: np.ndarray) -> OnnxStepOutput:
        """A checked (B, n, F) float32 batch through the full step graph with IO binding: the
        states go in and come out as OrtValues on the session's device (uploaded from the host
        only after a host read or change of ``states``); frames, positions and ends go in from
        the host, and logits, frame indices, validity and positions come back to it."""
        import onnxruntime as ort

        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        if self._device_states is None:
            self._device_states = {name: ort.OrtValue.ortvalue_from_numpy(value, self._ort_device, 0)
                                   for name, value in self._host_states.items()}
        binding.bind_cpu_input("frames", x)
        binding.bind_cpu_input("position", np.ascontiguousarray(self.positions))
        binding.bind_cpu_input("end", np.ascontiguousarray(self.ends))
        for name in self._state_names:
            binding.bind_ortvalue_input(name, self._device_states[name])
        for name in self._outputs[:4]:
            binding.bind_output(name, "cpu")
        for name in self._state_names:
            binding.bind_output(f"{name}_out", self._ort_device, 0)
        self.file.session.run_with_iobinding(binding)
        logits, frame_index, valid, positions, *new_states = binding.get_outputs()
        self._device_states = dict(zip(self._state_names, new_states))
        self.positions = positions.numpy()
        self._steady = None
        return OnnxStepOutput(logits.numpy(), frame_index.numpy(), valid.numpy())

    def _steady_step(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A checked (B, n, F) float32 batch through the steady session -> (logits (B, n, C),
        positions before the step (B,)). Every row is then a valid new frame."""
        feeds = self.states.copy()
        feeds["frames"] = x
        first = self.positions
        if self._steady_ring:
            feeds[DIL_READ], feeds[DIL_WRITE] = self._ring_indices(first, x.shape[1])
        logits, *new_states = self._run_steady(self._steady_outputs, feeds)
        self.states = dict(zip(self._state_names, new_states))
        self.positions = first + x.shape[1]  # a new array: ``first`` stays the step's own
        return logits, first

    def _ring_indices(self, positions: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The n-frame steady step's DIL_READ (B, R + n) and DIL_WRITE (B, R) rows for streams at
        ``positions`` (B,), as StepGraph._dil_window computes them: flat rows of the ring's R
        rows and the n new frames, stream b's at b (R + n). One stream: cached by position mod R
        and n (a few numpy ops per step otherwise)."""
        r = self._ring_rows
        key = (int(positions[0]) % r, n) if self.batch_size == 1 else None
        cached = self._ring_cache.get(key) if key is not None else None
        if cached is not None:
            return cached
        p = positions[:, None]
        base = np.arange(len(positions), dtype=np.int64)[:, None] * (r + n)
        i = np.arange(r + n, dtype=np.int64)
        read = np.where(i < r, (p + i) % r, i) + base
        s = np.arange(r, dtype=np.int64)
        ahead = (s - p - n) % r + (n - r)  # ring row s after the step: frame position + ahead
        write = np.where(ahead >= 0, ahead + r, s) + base
        if key is not None:
            if len(self._ring_cache) >= 4096:  # bounded: n is the caller's choice
                self._ring_cache.clear()
            self._ring_cache[key] = read, write
        return read, write

    def _one_frame_step(self, x: np.ndarray, taps: np.ndarray, slots) -> np.ndarray:
        """A checked (B, 1, F) float32 batch through the one-frame steady session, given the
        ring's tap rows (B, 1, K - 1) and each stream's ring row position mod R (B,) or, for one
        stream, an int -> logits (B, 1, C). Advances the states, not the positions."""
        states = self.states
        feeds = states.copy()
        feeds["frames"] = x
        feeds[DIL_TAPS] = taps
        logits, *windows, frame = self._run_one_frame(self._one_frame_outputs, feeds)
        for name, window in zip(self._one_frame_names, windows):
            states[name] = np.ascontiguousarray(window[self._next_history[name]])  # a view where B == 1
        ring = states["dil_history"]
        if type(slots) is int:
            ring[0, slots] = frame[0, 0, 0]
        else:
            ring[np.arange(len(slots)), slots] = frame[:, 0, 0]
        return logits

    def push(self, frames: np.ndarray) -> np.ndarray:
        """One stream: frames (n, F) -> logits (m, C) of the newly completed output frames."""
        if self.batch_size != 1:
            raise RuntimeError("push/flush serve one stream; with several use step/end/reset")
        x = frames
        # Checked before converting: np.ascontiguousarray on every push is not free at one frame.
        if type(x) is not np.ndarray or x.dtype is not _F32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0]
        if n == 0:
            return np.zeros((0, len(self.config.labels)), np.float32)
        if x.ndim == 2 and x.shape[1] == self._n_mels and (self._steady or (self._steady is None and self._is_steady())):
            # Every row is a new frame: no step output object, no bounds (Python that runs slowly
            # right after onnxruntime's run), and the position counted in an int (see positions).
            if n == 1 and self._one_frame_session is not None:  # _one_frame_step, inlined (the call costs)
                slot = (int(self._positions[0]) + self._advance) % self._ring_rows
                states = self.states
                feeds = states.copy()
                feeds["frames"] = x[None]
                feeds[DIL_TAPS] = self._tap_table[slot]
                outputs = self._run_one_frame(self._one_frame_outputs, feeds)
                next_history = self._next_history
                for name, window in zip(self._one_frame_names, outputs[1:-1]):
                    states[name] = window[next_history[name]]  # one stream: contiguous
                states["dil_history"][0, slot] = outputs[-1][0, 0, 0]
                self._advance += 1
                return outputs[0][0]
            feeds = self.states.copy()
            feeds["frames"] = x[None]
            if self._steady_ring:
                feeds[DIL_READ], feeds[DIL_WRITE] = self._ring_indices(self.positions, n)
            logits, *new_states = self._run_steady(self._steady_outputs, feeds)
            self.states = dict(zip(self._state_names, new_states))
            self._advance += n
            return logits[0]
        lo, hi = self.plan.push_bounds(int(self.positions[0]), int(self.ends[0]), n)
        return self.step(x[None]).logits[0, lo:hi]

    def flush(self) -> np.ndarray:
        """One stream: end it and return its last lookahead frames' logits."""
        self.end()
        pending = self.plan.pending_after_end(int(self.positions[0]), int(self.ends[0]))
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
