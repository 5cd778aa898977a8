"""Static int8 quantization of rtsed ONNX graphs, calibrated on real audio.

    python -m rtsed.export --model M.pt --out M_int8.onnx --streaming --quantize int8 --calibration DIR

onnxruntime.quantization's ``quantize_static`` in QDQ form: signed int8 activations and weights
(S8S8), weights per output channel, activation ranges from percentile calibration (each
tensor's range cut at its 0.0005th and 99.9995th percentiles over every calibration step,
``DEFAULT_PERCENTILE``). MinMax ranges (``method="minmax"``) stretch to the rarest outlier
frame and leave a coarser grid for every other frame: on dnd_7_10's validation scenes they
moved the probabilities 1.4x as far from fp32's as the percentile ranges. After quantizing,
each quantized conv's bias is corrected by its mean int8 minus fp32 output per channel on the
calibration feeds, conv by conv (``correct_conv_biases``), and each class's logit bias is corrected by the int8 graph's mean logit error near the decision
threshold on the calibration feeds (``correct_logit_bias``). onnxruntime fuses
each DequantizeLinear -> op -> QuantizeLinear group into an integer kernel (QLinearConv, with
VNNI where the CPU has it). Calibration streams the scenes of DIR through the fp32 step graph
and records every step's real inputs, carried state included (``CalibrationFeeds``), so that
each step-graph variant (masked, steady, one-frame: ``rtsed.stream.onnx_export``) sees the
activations it will see in service. The offline graph is calibrated on the scenes' whole
log-mel sequences.

What stays fp32, and why:
- the carried state: the nodes that read a state input or write a state output (the CNN blocks'
  history Concat/Slice, f_dil's ring Gathers, Reshape and ScatterElements). State inputs and
  outputs are fp32 tensors holding exactly the values the step computed, so nothing is rounded
  again on its way through the state and a stream cannot drift from its offline twin; a state
  node reads the fp32 value itself, never its dequantized copy (``keep_fp32_state_reads``);
- the logits, unless ``quantize_logits``: int8 logits with one scale over every class moved
  probabilities by several hundredths. The step graph's classifier is a MatMul over f_dil's
  channels-last output (``StepGraph(channels_last_head=True)``) whose inputs and per-channel
  weights are int8 and whose output is fp32 (onnxruntime's MatMulIntegerToFloat); a Conv
  classifier (the offline graph) stays fp32 whole;
- the normalisation (Sub/Div) and every integer index computation (not quantizable anyway).

The three variants of a step graph hold the same int8 weights, stored once in the file
(``rtsed.stream.onnx_export.share_weights``).

The file records its precision (``rtsed_precision`` = ``int8``) and its calibration
(``rtsed_calibration``: folder, files, SHA-256 of their bytes, frames, steps) in the metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rtsed.config import DetectorConfig
from rtsed.stream.plan import NO_END

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
PRECISIONS = ("fp32", "int8")
# Steps of this many frames are what calibration records; the one-frame variant is calibrated on
# the first frame of each (its state at that position is the same).
CALIBRATION_FRAMES_PER_STEP = 16
CALIBRATION_METHODS = ("percentile", "minmax")
# Percentile calibration keeps this central share (per cent) of each tensor's calibration values,
# cutting half the rest from each end. Chosen on dnd_7_10's validation scenes (README, int8 streaming).
DEFAULT_PERCENTILE = 99.999
# Offline graphs are calibrated on pieces of this many frames (at most) of the scenes: the
# percentile calibrator stacks every feed of a tensor, so the feeds must share a shape.
OFFLINE_CALIBRATION_FRAMES = 512
# Logit bias correction is fitted on the calibration cells whose fp32 logit lies within this band
# around 0 (probabilities 0.27-0.73, where the operating points' thresholds lie), per class, and
# on all of a class's cells where fewer than LOGIT_BIAS_MIN_CELLS fall in the band.
DECISION_LOGIT_BAND = 1.0
LOGIT_BIAS_MIN_CELLS = 20


class QuantizeError(ValueError):
    """Calibration audio or a graph that cannot be quantized; the message says why and the fix."""


@dataclass(frozen=True)
class Calibration:
    """What a quantized graph was calibrated on: written into its metadata (``rtsed_calibration``)."""

    folder: str
    files: tuple[str, ...]  # relative to folder, sorted
    sha256: str  # of every file's relative name and bytes, in that order
    frames: int  # log-mel frames streamed (20 ms each at the default hop)
    steps: int  # step inputs recorded per variant
    method: str  # Calibration.describe

    @staticmethod
    def describe(method: str, percentile: float = DEFAULT_PERCENTILE, conv_bias_correction: bool = True) -> str:
        ranges = f"Percentile {percentile:g}" if method == "percentile" else "MinMax"
        convs = "conv biases corrected per channel, " if conv_bias_correction else ""
        return (f"{ranges}, QDQ S8S8, per-channel weights (onnxruntime.quantization.quantize_static), "
                f"{convs}logit bias corrected near the decision threshold")

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def calibration_files(folder: str | Path) -> list[Path]:
    """The audio files under ``folder`` (recursively), sorted; QuantizeError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QuantizeError(f"--calibration {folder}: no such folder; give a folder of audio scenes "
                            "from the model's training side (never its test scenes)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise QuantizeError(f"--calibration {folder}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in it; "
                            "give a folder of audio scenes from the model's training side")
    return files


def files_digest(folder: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def calibration_logmels(files: list[Path], config: DetectorConfig) -> list[np.ndarray]:
    """Each file as raw log-mel frames (T, n_mels) float32, at the model's rate (the front end's
    arithmetic, as rtsed.detect computes it)."""
    from rtsed.audio.files import read_audio
    from rtsed.audio.frontend import LogMel

    logmel = LogMel(config.frontend)
    out = []
    with torch.no_grad():
        for path in files:
            samples = read_audio(path, config.frontend.sample_rate_hz)
            out.append(logmel(torch.from_numpy(samples)).numpy())
    return out


def step_feeds(step_graph: str | Path, logmels: list[np.ndarray], max_steps: int,
               frames_per_step: int = CALIBRATION_FRAMES_PER_STEP) -> list[dict[str, np.ndarray]]:
    """Real step inputs: each scene streamed through the fp32 step graph (one stream, steps of
    ``frames_per_step``, then ended and flushed as a stream is) -> the feeds of every step
    (frames, position, end and each state tensor as it was before that step), at most
    ``max_steps`` of them spread evenly over all steps, the flush steps always kept."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(step_graph), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    specs = json.loads(meta["rtsed_state"])
    lookahead = int(meta["rtsed_lookahead_frames"])
    names = [s["name"] for s in specs]
    outputs = ["position_out", *[f"{n}_out" for n in names]]
    total = sum(-(-len(x) // frames_per_step) for x in logmels)
    keep_every = max(1, -(-total // max(1, max_steps - 2 * len(logmels))))
    feeds, step = [], 0
    for scene in logmels:
        states = {s["name"]: np.zeros([1 if d == "batch" else d for d in s["shape"]], np.float32) for s in specs}
        position, end = np.zeros(1, np.int64), np.full(1, NO_END, np.int64)
        chunks = [scene[i:i + frames_per_step] for i in range(0, len(scene), frames_per_step)]
        flush = np.zeros((lookahead, scene.shape[1]), np.float32)
        chunks += [flush] if lookahead else []
        for i, chunk in enumerate(chunks):
            last = lookahead and i == len(chunks) - 1
            if last:
                end = position.copy()
            feed = {"frames": np.ascontiguousarray(chunk[None], np.float32), "position": position, "end": end,
                    **states}
            if step % keep_every == 0 or last:
                feeds.append({k: np.array(v) for k, v in feed.items()})
            step += 1
            position, *new = session.run(outputs, feed)
            states = dict(zip(names, new))
    return feeds


class _Reader:
    """A CalibrationDataReader over recorded feeds, each cut to the inputs a graph has (and to
    its first frame for the one-frame variant). ``uniform``: only the feeds whose every input
    has the most common feed's shapes (the percentile calibrator stacks them): a scene's last,
    shorter step and the flush steps are left out, whose values the full steps' ranges cover
    (the flush feeds zeros that the graph masks as offline padding)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], inputs: set[str], one_frame: bool, uniform: bool = False):
        self._feeds, self._inputs, self._one_frame = feeds, inputs, one_frame
        self._shapes = None
        if uniform and not one_frame and feeds:  # one-frame feeds are all alike
            shapes = [tuple(sorted((k, v.shape) for k, v in f.items())) for f in feeds]
            self._shapes = max(set(shapes), key=shapes.count)
        self._i = 0

    def get_next(self):
        while self._i < len(self._feeds):
            feed = self._feeds[self._i]
            self._i += 1
            if self._one_frame and feed["end"][0] != NO_END:
                continue  # the one-frame variant serves running streams only
            if self._shapes is not None and tuple(sorted((k, v.shape) for k, v in feed.items())) != self._shapes:
                continue
            out = {k: v for k, v in feed.items() if k in self._inputs}
            if self._one_frame:
                out["frames"] = np.ascontiguousarray(out["frames"][:, :1])
            return out
        return None

    def rewind(self):
        self._i = 0


def state_nodes(proto) -> list[str]:
    """Names of the nodes that must stay fp32 to keep the carried state exact: every node that
    reads a state input (``*_history``) or writes a state output (``*_history_out``), and those
    between the ring and its Gathers (f_dil's Concat + Reshape of ring and new frames)."""
    g = proto.graph
    state_in = {i.name for i in g.input if i.name.endswith("_history")}
    state_out = {o.name for o in g.output if o.name.endswith("_history_out")}
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    keep = []
    for n in g.node:
        if state_in & set(n.input) or state_out & set(n.output) or n.op_type == "ScatterElements":
            keep.append(n.name)
            # A ring's Concat feeds a Reshape that both Gathers (window and next ring) read.
            if n.op_type == "Concat":
                keep += [c.name for c in consumers.get(n.output[0], []) if c.op_type == "Reshape"]
    return keep


def keep_fp32_state_reads(proto, state: set[str]) -> None:
    """Rewire (in place) each state node that reads DequantizeLinear(QuantizeLinear(x)) of an
    fp32 x (a graph input, or the output of another state node) to read x itself, and drop the
    quantize pairs left without readers.

    The quantizer quantizes a tensor once for all its readers, so block 0's window (the Concat of
    its history and the new frames) reached both its conv and the Slice that makes the next
    history through the same DequantizeLinear: the history was then rounded to the conv's input
    grid, and the DequantizeLinear, having two readers, kept onnxruntime from fusing block 0's
    conv into an integer kernel (its QDQ fusion wants a DequantizeLinear that only the conv
    reads). Read directly, the history stays exactly the fp32 frames."""
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    graph_inputs = {i.name for i in g.input}
    for node in g.node:
        if node.name not in state:
            continue
        for i, x in enumerate(node.input):
            dq = producer.get(x)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                continue
            source = q.input[0]
            if source in graph_inputs or (source in producer and producer[source].name in state):
                node.input[i] = source
    outputs = {o.name for o in g.output}
    while True:  # drop quantize/dequantize nodes nobody reads any more
        read = {x for n in g.node for x in n.input} | outputs
        dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in read]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)


def quantize_windows_before_transpose(proto) -> list[str]:
    """Where a state Concat (a CNN block's window: history + new frames) reaches its conv through
    a Transpose (channels-last history to NCHW) whose output is quantized, add the same
    QuantizeLinear/DequantizeLinear pair (own copies of its scale and zero point) between the
    Concat and the Transpose, in place; the names of the Transposes so treated.

    Rounding commutes with a transpose, so the arithmetic is unchanged; but onnxruntime then
    moves the window's transpose on int8 values and cancels it against its own channels-last
    conv layout, where with an fp32 Transpose it quantized the Concat output itself and, the
    window being a step output too (the one-frame variant's), added a dequantized copy for that
    output and a second Q/DQ pair for the conv: six nodes per block instead of three (about 5%
    of a one-frame int8 step). The window output and the next history still read the Concat's
    fp32 values."""
    from onnx import helper, numpy_helper

    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    initializers = {i.name: i for i in g.initializer}
    done = []
    for transpose in list(g.node):
        source = producer.get(transpose.input[0]) if transpose.op_type == "Transpose" else None
        readers = consumers.get(transpose.output[0], [])
        if source is None or source.op_type != "Concat" or [r.op_type for r in readers] != ["QuantizeLinear"]:
            continue
        q, window = readers[0], transpose.input[0]
        params = []
        for k, what in ((1, "scale"), (2, "zero_point")):
            value = numpy_helper.to_array(initializers[q.input[k]])
            g.initializer.append(numpy_helper.from_array(value, f"{window}_pre_transpose_{what}"))
            params.append(f"{window}_pre_transpose_{what}")
        at = list(g.node).index(transpose)
        quantized, dequantized = f"{window}_pre_transpose_q", f"{window}_pre_transpose_dq"
        g.node.insert(at, helper.make_node("DequantizeLinear", [quantized, *params], [dequantized],
                                           name=f"{window}_pre_transpose_DequantizeLinear"))
        g.node.insert(at, helper.make_node("QuantizeLinear", [window, *params], [quantized],
                                           name=f"{window}_pre_transpose_QuantizeLinear"))
        transpose.input[0] = dequantized
        done.append(transpose.name)
    return done


def classifier_nodes(proto) -> list[str]:
    """The node that makes the logits (the last Conv / Gemm / MatMul in graph order) and every
    node after it on the way to the outputs (layout ops, Sigmoid): quantizing any of those would
    put the logits themselves on an int8 grid."""
    g = proto.graph
    last = [n for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul")][-1:]
    tail, reached = [n.name for n in last], {x for n in last for x in n.output}
    for n in g.node:  # topologically sorted: one forward sweep
        if reached & set(n.input) and n.name not in tail:
            tail.append(n.name)
            reached |= set(n.output)
    return tail


def constants_as_initializers(proto):
    """The model with every floating-point Constant node made an initializer: the exporter leaves
    the BN-folded weights as Constants, and the quantizer quantizes only initializer weights."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    nodes = []
    for node in g.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and numpy_helper.to_array(value).dtype.kind == "f":
            g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value), node.output[0]))
            continue
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    return out


def logit_bias_node(proto):
    """(node, input index) of the fp32 bias that the logits take last: the constant operand of the
    Add that makes ``logits`` (the channels-last head) or the bias of the Conv/Gemm classifier
    (the offline graph), reached back from the output through layout ops; None if neither."""
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    constants = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    node = producer.get("logits")
    while node is not None and node.op_type in ("Transpose", "Reshape", "Squeeze", "Unsqueeze"):
        node = producer.get(node.input[0])
    if node is None:
        return None
    if node.op_type == "Add":
        return next(((node, i) for i, x in enumerate(node.input) if x in constants), None)
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] in constants:
        return node, 2
    return None


def _outputs_on_feeds(proto, feeds: list[dict[str, np.ndarray]], one_frame: bool, names: list[str]):
    """``names``' values of ``proto`` (onnxruntime, CPU) on every calibration feed, one list per
    feed, the feeds cut to the graph's inputs as the calibrator cuts them (``_Reader``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    reader = _Reader(feeds, {i.name for i in session.get_inputs()}, one_frame)
    while (feed := reader.get_next()) is not None:
        yield session.run(names, feed)


def graph_logits(proto, feeds: list[dict[str, np.ndarray]], one_frame: bool) -> np.ndarray:
    """The ``logits`` output (..., C) of ``proto`` on every calibration feed, as (cells, C)."""
    return np.concatenate([logits.reshape(-1, logits.shape[-1])
                           for (logits,) in _outputs_on_feeds(proto, feeds, one_frame, ["logits"])])


def correct_logit_bias(fp32, int8, feeds: list[dict[str, np.ndarray]], one_frame: bool = False) -> np.ndarray:
    """Subtract from ``int8``'s logit bias (in place) the mean per class of int8 minus fp32 logits
    on the calibration feeds, over the cells near the decision threshold (DECISION_LOGIT_BAND);
    the correction (C,), or None where the logits have no fp32 bias to correct.

    Rounding is not unbiased through max-pooling and ReLUs: near the threshold the int8 logits
    of dnd_7_10 sat about 0.01-0.02 below fp32's on validation scenes, so that twice as many
    active frames fell below 0.5 as rose above it. The correction is fitted on the calibration
    audio, where the decisions are made, not on all cells (most sit far below the threshold)."""
    from onnx import numpy_helper

    found = logit_bias_node(int8)
    if found is None:
        return None
    node, index = found
    reference, quantized = graph_logits(fp32, feeds, one_frame), graph_logits(int8, feeds, one_frame)
    error = quantized - reference
    near = np.abs(reference) < DECISION_LOGIT_BAND
    correction = np.array([error[near[:, c], c].mean() if near[:, c].sum() >= LOGIT_BIAS_MIN_CELLS
                           else error[:, c].mean() for c in range(error.shape[1])], np.float32)
    name = node.input[index]
    initializer = next((i for i in int8.graph.initializer if i.name == name), None)
    if initializer is not None:
        bias = numpy_helper.to_array(initializer)
        initializer.CopyFrom(numpy_helper.from_array((bias - correction.reshape(bias.shape)).astype(bias.dtype), name))
    else:
        tensor = next(a.t for n in int8.graph.node if n.op_type == "Constant" and name in n.output
                      for a in n.attribute if a.name == "value")
        bias = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array((bias - correction.reshape(bias.shape)).astype(bias.dtype)))
    return correction


def _channel_means(proto, feeds: list[dict[str, np.ndarray]], one_frame: bool, tensors: list[str]) -> list[np.ndarray]:
    """The mean per channel (axis 1: Conv outputs are NCHW) of each of ``tensors`` of ``proto``
    over every calibration feed (each a (C,) float64), the tensors exposed as extra outputs."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in tensors if t not in known)
    sums, counts = [0.0] * len(tensors), [0] * len(tensors)
    for values in _outputs_on_feeds(probe, feeds, one_frame, tensors):
        for i, y in enumerate(values):
            y = np.moveaxis(y, 1, 0).reshape(y.shape[1], -1).astype(np.float64)
            sums[i] = sums[i] + y.sum(axis=1)
            counts[i] += y.shape[1]
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def correct_conv_biases(fp32, int8, feeds: list[dict[str, np.ndarray]], one_frame: bool = False) -> dict[str, np.ndarray]:
    """Empirical bias correction of every quantized Conv of ``int8`` (in place), in graph order:
    subtract from its bias the mean per output channel of its int8 output minus the same conv's
    output in ``fp32``, over the calibration feeds; {conv name: correction (C,)}. The bias is the
    int32 one onnxruntime's quantizer makes (DequantizeLinear with scale = input scale x weight
    scale, corrected in whole steps of it) or an fp32 initializer.

    Each conv is measured after the ones before it are corrected, so its correction also takes up
    what reaches it from upstream: the mean error that rounding a conv's weights leaves where its
    inputs do not average zero (after ReLU and max-pooling), and the upward shift a max-pool gives
    noisy values. The outputs compared are the Conv nodes' own (before any activation the
    quantizer folded into the Conv's output range)."""
    from onnx import numpy_helper

    producer = {o: n for n in int8.graph.node for o in n.output}
    reference = {n.name: n.output[0] for n in fp32.graph.node if n.op_type == "Conv"}
    initializers = {i.name: i for i in int8.graph.initializer}
    readers: dict[str, int] = {}
    for n in int8.graph.node:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1

    def bias_of(conv):
        """(initializer, scale): the fp32 bias itself (scale None), or the int32 bias the quantizer
        made (DequantizeLinear(int32, scale = input scale x weight scale, zero point 0)); None
        where the bias is neither or is read by other nodes too."""
        if len(conv.input) < 3 or readers.get(conv.input[2]) != 1:
            return None
        if conv.input[2] in initializers:
            return initializers[conv.input[2]], None
        dq = producer.get(conv.input[2])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers \
                or dq.input[1] not in initializers or readers.get(dq.input[0]) != 1:
            return None
        return initializers[dq.input[0]], numpy_helper.to_array(initializers[dq.input[1]])

    convs = [(n, bias_of(n)) for n in int8.graph.node if n.op_type == "Conv" and n.name in reference
             and getattr(producer.get(n.input[1]), "op_type", None) == "DequantizeLinear"]
    convs = [(n, b) for n, b in convs if b is not None]
    if not convs:
        return {}
    targets = _channel_means(fp32, feeds, one_frame, [reference[n.name] for n, _ in convs])
    corrections = {}
    for (conv, (init, scale)), target in zip(convs, targets):
        (got,) = _channel_means(int8, feeds, one_frame, [conv.output[0]])
        bias = numpy_helper.to_array(init)
        correction = (got - target).reshape(bias.shape)
        if scale is None:
            bias = (bias - correction).astype(bias.dtype)
        else:  # int32 steps of the bias's own scale
            info = np.iinfo(bias.dtype)
            bias = np.clip(bias - np.round(correction / scale), info.min, info.max).astype(bias.dtype)
        init.CopyFrom(numpy_helper.from_array(bias, init.name))
        corrections[conv.name] = correction.astype(np.float32)
    return corrections


def quantize_proto(proto, feeds: list[dict[str, np.ndarray]], one_frame: bool = False,
                   quantize_logits: bool = False, exclude: tuple[str, ...] = (), method: str = "percentile",
                   percentile: float = DEFAULT_PERCENTILE, conv_bias_correction: bool = True):
    """An fp32 ModelProto (an offline graph or one step-graph variant, no If) -> its QDQ int8
    ModelProto, calibrated on ``feeds`` (each cut to the graph's inputs) with ``method``
    (CALIBRATION_METHODS; "percentile" keeps ``percentile`` per cent of each tensor's values in
    range). ``exclude``: more node names to keep in fp32. ``conv_bias_correction``: correct each
    quantized conv's bias on the feeds (``correct_conv_biases``)."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_static)

    proto = constants_as_initializers(proto)
    inputs = {i.name for i in proto.graph.input}
    classifier = [] if quantize_logits else classifier_nodes(proto)
    # No CalibMaxIntermediateOutputs: onnxruntime's MinMax calibrator (1.32 here) drops each full
    # batch of that many recorded outputs without taking their ranges, so only the last
    # len(feeds) mod N feeds set the ranges (and none when len(feeds) is a multiple of N). What it
    # keeps per feed is one min and one max per tensor: all feeds fit in memory.
    if method not in CALIBRATION_METHODS:
        raise QuantizeError(f"calibration method {method!r}: use one of {', '.join(CALIBRATION_METHODS)}")
    options = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if method == "percentile":
        options["CalibPercentile"] = float(percentile)
    op_types = {n.name: n.op_type for n in proto.graph.node}
    if classifier and op_types[classifier[0]] == "MatMul":
        # A MatMul classifier (StepGraph's channels-last head) takes int8 inputs and per-channel
        # int8 weights but keeps an fp32 output: onnxruntime runs it as MatMulIntegerToFloat, and
        # the logits never sit on an int8 grid. No other node of these graphs is a MatMul.
        classifier = classifier[1:]
        options["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    excluded = state_nodes(proto) + classifier + list(exclude)
    with tempfile.TemporaryDirectory(prefix="rtsed-quantize-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, str(src))
        # The quantizer logs advice (pre-processing) on the root logger at WARNING: not the user's concern.
        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR
        try:
            reader = _Reader(feeds, inputs, one_frame, uniform=method == "percentile")
            calibrate = CalibrationMethod.Percentile if method == "percentile" else CalibrationMethod.MinMax
            # The histogram calibrator prints its progress on stdout: kept off the user's terminal.
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                calibrate_method=calibrate, nodes_to_exclude=excluded,
                                extra_options=options,
                                calibration_providers=["CPUExecutionProvider"])
        finally:
            root.setLevel(level)
        out = onnx.load(str(dst))
    keep_fp32_state_reads(out, set(state_nodes(proto)))
    quantize_windows_before_transpose(out)
    if conv_bias_correction:
        correct_conv_biases(proto, out, feeds, one_frame)
    if not quantize_logits:
        correct_logit_bias(proto, out, feeds, one_frame)
    # The quantizer drops the value infos of the outputs' dynamic axes only in name; keep the
    # graph's own interface exactly (names, order).
    if [o.name for o in out.graph.output] != [o.name for o in proto.graph.output]:
        raise QuantizeError("quantization changed the graph's outputs (onnxruntime.quantization change?)")
    return out


def export_int8(model, config: DetectorConfig, out: str | Path, calibration: str | Path, streaming: bool = False,
                max_steps: int = 512, quantize_logits: bool = False, exclude: tuple[str, ...] = (),
                method: str = "percentile", percentile: float = DEFAULT_PERCENTILE,
                conv_bias_correction: bool = True) -> Path:
    """Export a model's offline (or step) graph quantized to int8 (see the module docstring),
    calibrated on the audio files under ``calibration`` with ``method`` (CALIBRATION_METHODS)
    and ``percentile``. Returns the written path."""
    if method not in CALIBRATION_METHODS:
        raise QuantizeError(f"calibration method {method!r}: use one of {', '.join(CALIBRATION_METHODS)}")
    from rtsed.stream.onnx_export import export_onnx

    folder = Path(calibration)
    files = calibration_files(folder)
    logmels = calibration_logmels(files, config)
    frames = sum(len(x) for x in logmels)
    if frames == 0:
        raise QuantizeError(f"--calibration {folder}: its files are shorter than one analysis window")
    with tempfile.TemporaryDirectory(prefix="rtsed-calibrate-") as tmp:
        if streaming:
            fp32 = export_onnx(model, config, Path(tmp) / "fp32_step.onnx", streaming=True)
            feeds = step_feeds(fp32, logmels, max_steps)
        else:  # the scenes in pieces of one length (see OFFLINE_CALIBRATION_FRAMES), at most max_steps of them
            piece = min(OFFLINE_CALIBRATION_FRAMES, min(len(x) for x in logmels if len(x)))
            pieces = [x[i:i + piece] for x in logmels for i in range(0, len(x) - piece + 1, piece)]
            every = max(1, -(-len(pieces) // max_steps))
            feeds = [{"logmel": np.ascontiguousarray(x[None])} for x in pieces[::every]]
    record = Calibration(str(folder.resolve()), tuple(str(p.relative_to(folder)) for p in files),
                         files_digest(folder, files), frames, len(feeds),
                         Calibration.describe(method, percentile, conv_bias_correction))

    def transform(proto, variant: str):
        return quantize_proto(proto, feeds, one_frame=variant == "one_frame", quantize_logits=quantize_logits,
                              exclude=exclude, method=method, percentile=percentile,
                              conv_bias_correction=conv_bias_correction)

    meta = {"rtsed_precision": "int8", "rtsed_calibration": record.to_json(),
            "rtsed_quantized_logits": str(bool(quantize_logits)).lower()}
    return export_onnx(model, config, out, streaming=streaming, transform=transform, metadata=meta,
                       channels_last_head=True)
