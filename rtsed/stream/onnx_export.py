"""ONNX export: an offline graph and a streaming step graph, self-described by metadata.

    python -m rtsed.export --model X.pt --out X.onnx              offline: log-mel (B, T, F) -> probabilities
    python -m rtsed.export --model X.pt --out X.onnx --streaming  step: (frames, position, end, states) -> (...)

Both graphs take raw log-mel frames (the front end's output) and normalise inside, so a consumer
needs only the file: the metadata carries the detector config (front end, model, labels,
normalisation, decoder) as JSON, the state tensors' names and shapes, the lookahead, and
``rtsed_content_sha256``, the SHA-256 of the serialized graph (``graph_digest``), which
``rtsed.stream.onnx_runtime`` checks on load (rtsed.models.integrity says why).

The step graph is ``ModelStream.step`` written without in-place state: every state tensor is an
input and its update an output (``<name>`` -> ``<name>_out``). The CNN blocks' short histories are
kept in time order (new frames concatenated, the oldest sliced off); f_dil's (``dil_history``,
(B, R, C) with R = (K - 1) d past frames) is a ring indexed by stream position: the f_dil input
frame that arrived with stream position q sits in row q mod R, so a one-frame step reads only its
K - 1 tap rows and writes one row (see ``StepGraph.forward``). The arithmetic is ModelStream's.
Step protocol (per stream b of the batch):

- ``position[b]``: frames this stream has consumed, 0 at its start (feed back ``position_out``);
- ``end[b]``: ``NO_END`` while the stream runs; to finish, set it to the stream's ``position``
  and feed ``lookahead_frames`` more frames (any values: they are treated as offline padding);
- outputs ``frame_index`` (B, n) and ``valid`` (B, n): which offline frame each output row is,
  and whether it is a real one (rows before the lookahead has filled, or after the end, are not).

The step is in the file twice, behind one If (opset 13 up): the masked step above for batches in
which some stream is still inside its first ``lookahead_frames`` or has ended, and a steady-state
step without the masks (all ones then) for the rest. Same inputs, outputs and arithmetic;
``rtsed.stream.onnx_runtime.OnnxStream`` runs the steady branch as a session of its own
(``steady_step_model``), skipping the If's own cost. With f_dil (``rtsed_step_variants`` =
``steady-if-1``) the steady branch is itself an If on the step's frame count: a one-frame variant
(the K - 1 taps gathered from the ring, ``dil_taps``) for n == 1, the n-frame one otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtsed.atomic import write_atomically
from rtsed.backends.dispatch import eval_fast_path
from rtsed.config import DetectorConfig, NormalizationStats
from rtsed.models.layers import DilatedTemporal
from rtsed.models.model import SEDModel
from rtsed.stream.plan import NO_END, StreamPlan

ONNX_FORMAT = "rtsed-onnx"
ONNX_FORMAT_VERSION = 1
OPSET = 17
# Bumped whenever the exported step graph changes shape or speed, so that caches keyed on a
# checkpoint (rtsed.serve.engine.exported_step_graph) export again instead of serving an old graph.
STEP_GRAPH_REVISION = 4


class ExportError(ValueError):
    """A model or config that cannot be exported; the message says why and what to do."""


class _Normalize(nn.Module):
    def __init__(self, config: DetectorConfig):
        super().__init__()
        norm = config.normalization or NormalizationStats.identity(config.model.n_mels)
        self.register_buffer("mean", torch.tensor(norm.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(norm.std, dtype=torch.float32))

    def forward(self, logmel: Tensor) -> Tensor:
        return (logmel - self.mean) / self.std


class OfflineGraph(nn.Module):
    """logmel (B, T, F) -> probabilities (B, T, C), logits (B, T, C)."""

    def __init__(self, model: SEDModel, config: DetectorConfig):
        super().__init__()
        self.model, self.normalize = model, _Normalize(config)

    def forward(self, logmel: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(self.normalize(logmel))
        return torch.sigmoid(logits), logits


class StepGraph(nn.Module):
    """The streaming step as a pure function of its inputs (see the module docstring).

    ``steady=True`` is the same step for a batch whose streams are all past their lookahead and
    none ended: every start/end mask is then all ones, so it is left out (``export_onnx`` puts
    both variants in one file behind an If on position and end). The masks were ~35 of the 113
    nodes onnxruntime ran per step.

    ``channels_last_head=True`` (f_dil models; the int8 export) writes the classifier as a MatMul
    over f_dil's output taken channels-last, (B, n, W C_out) with index w C_out + c, where fp32
    graphs use a (1, W) Conv over (B, C_out, n, W): onnxruntime runs int8 convolutions
    channels-last, so the quantized f_dil output is already in that order (the layout Transpose
    it would insert cancels against this one), and a MatMul with int8 inputs and an fp32 output
    runs as one integer kernel (MatMulIntegerToFloat). The Conv form made onnxruntime dequantize
    f_dil's whole (B, C_out, n, W) output to fp32 and reorder it for an fp32 convolution."""

    def __init__(self, model: SEDModel, config: DetectorConfig, steady: bool = False, one_frame: bool = False,
                 channels_last_head: bool = False):
        super().__init__()
        self.model, self.normalize = model, _Normalize(config)
        self.channels_last_head = channels_last_head
        # one_frame: the steady step specialised for n == 1 (f_dil models only; see forward).
        self.steady, self.one_frame = steady or one_frame, one_frame
        self.plan = StreamPlan.of(model)
        self.block_delays, self.cnn_delay = self.plan.block_delays, self.plan.cnn_delay
        self.lookahead = self.plan.lookahead

    def state_specs(self) -> list[tuple[str, tuple[int | str, ...]]]:
        """[(name, shape)] of every state tensor, "batch" standing for the batch size.

        A block's past input frames are kept channels-last, (B, K - 1, F, C_in), where the block
        reads more than one channel: there the new frames join them as one contiguous copy per
        stream (Concat on axis 1) and the next history is one contiguous Slice, where NCHW
        histories (B, C_in, K - 1, F) took C_in strided pieces each; onnxruntime folds the two
        permutes into the reorders to and from its blocked conv layout that it runs anyway.
        Block 0 (one channel, where both layouts are the same memory) keeps (B, 1, K - 1, F)."""
        specs, freq = [], self.model.config.n_mels
        for i, block in enumerate(self.model.blocks):
            if block.in_channels == 1:
                specs.append((f"block{i}_history", ("batch", 1, block.context_frames, freq)))
            else:
                specs.append((f"block{i}_history", ("batch", block.context_frames, freq, block.in_channels)))
            freq //= block.pool.kernel_size[1]
        t = self.model.temporal
        if isinstance(t, DilatedTemporal):  # a ring: row q mod R holds the frame of stream position q (see forward)
            specs.append(("dil_history", ("batch", t.context_frames, t.channels)))
        else:  # any other family: its own state tensors (the TemporalPart protocol)
            specs.extend(t.state_specs())
        return specs

    def dil_taps(self) -> list[int]:
        """f_dil's K - 1 past taps of a one-frame step at stream position p, as offsets o: ring
        row (p + o) mod R holds frame p - R + o, the conv's tap o / d. [0, d, ..., R - d]."""
        t = self.model.temporal
        return list(range(0, t.context_frames, t.dilation))

    def initial_states(self, batch_size: int) -> list[Tensor]:
        return [torch.zeros([batch_size if d == "batch" else d for d in shape]) for _, shape in self.state_specs()]

    def forward(self, frames: Tensor, position: Tensor, end: Tensor, *states: Tensor):
        n = frames.shape[1]
        pos = position[:, None] + torch.arange(n, dtype=position.dtype)[None, :]  # (B, n)

        def keep(delay: int) -> Tensor:
            return self.plan.keep(pos, end[:, None], delay).to(frames.dtype)[:, None, :, None]

        h = self.normalize(frames).unsqueeze(1)
        if not self.steady:
            h = h * keep(0)
        new_states = []
        for block, delay, masked, hist in zip(self.model.blocks, self.block_delays, self.plan.masked_blocks, states):
            if block.in_channels == 1:
                window = torch.cat([hist, h], dim=2)
                # A negative start: one constant Slice, no Shape/Gather/Sub to compute it.
                new_states.append(window[:, :, -block.context_frames:])
            else:  # channels-last history (B, ctx, F, C), see state_specs
                window = torch.cat([hist, h.permute(0, 2, 3, 1)], dim=1)
                new_states.append(window[:, -block.context_frames:])
                window = window.permute(0, 3, 1, 2)
            h = block.valid_time(window)
            if masked and not self.steady:
                h = h * keep(delay)
        t = self.model.temporal
        temporal_states = list(states[len(self.model.blocks):])
        if not isinstance(t, DilatedTemporal):  # the TemporalPart protocol (f_dil's own step follows)
            skip = None
            if t.skips_warmup and not self.steady:  # steady: every stream is past the CNN delay
                skip = torch.clamp(self.cnn_delay - position, min=0)
                skip = torch.minimum(skip, torch.full_like(skip, n))
            feats, new = t.export_step(h.permute(0, 2, 3, 1).squeeze(2), temporal_states, skip)
            new_states.extend(new)
            logits = self.model.classifier(feats)
        else:
            temporal_state = temporal_states[0]
            if self.one_frame:  # (B, C, 1, 1) is (B, 1, 1, C) in memory: a Reshape, no Transpose node
                new = h.reshape(-1, 1, 1, t.channels)
            else:
                new = h.permute(0, 2, 3, 1).squeeze(2)
            window, new_ring, dilation = self._dil_window(new, position, temporal_state)
            new_states.append(new_ring)
            y = F.conv2d(window, t.conv.weight, t.conv.bias, stride=(1, t.stride), dilation=dilation)
            if self.channels_last_head and eval_fast_path(y, t.training):
                logits = self._channels_last_logits(y, frames.shape[0], n)
            elif eval_fast_path(y, t.training):  # BN folded into the classifier, as ModelStream does
                # (B, n_classes, n, 1) taken to (B, n, n_classes) as a permute that onnxruntime
                # folds into the Conv's output reorder (no Squeeze/Transpose nodes).
                logits = t.classifier_conv(y, self.model.classifier)
                if self.one_frame:  # (B, C, 1, 1) -> (B, 1, C), a Reshape again
                    logits = logits.reshape(-1, 1, self.model.classifier.out_features)
                else:  # [:, :, 0], not squeeze(2): behind the ring's Gathers the exporter no longer
                    # knows that axis is 1 and made squeeze an If on its size
                    logits = logits.permute(0, 2, 3, 1)[:, :, 0]
            else:
                logits = self.model.classifier(t._flatten(t.bn(F.relu(y))))
        frame_index = pos - self.lookahead
        valid = self.plan.valid(frame_index, end, steady=self.steady)  # steady: frame_index >= 0 for every row
        return (torch.sigmoid(logits), logits, frame_index, valid, position + n, *new_states)

    def _channels_last_logits(self, y: Tensor, batch, n) -> Tensor:
        """f_dil's conv output y (B, C_out, n, W) -> logits (B, n, n_classes) through ReLU and the
        BN-folded classifier, as one MatMul over (B, n, W C_out) (see the class docstring).
        ``batch`` and ``n`` come from the step's frames: a Reshape whose shape is read off y
        itself would make onnxruntime dequantize all of int8 y for its Shape node."""
        t = self.model.temporal
        weight, bias = t.folded_classifier(self.model.classifier)  # (k, C_out W), channel-major
        k, c, w = weight.shape[0], t.conv.out_channels, t.width
        # Row w C_out + c of the (W C_out, k) matrix is classifier input c W + w: a constant in the trace.
        matrix = weight.reshape(k, c, w).permute(2, 1, 0).reshape(w * c, k).contiguous()
        feats = F.relu(y).permute(0, 2, 3, 1)  # (B, n, W, C_out)
        if self.one_frame:  # n == 1: a constant shape, no Shape/Gather nodes
            feats = feats.reshape(-1, 1, w * c)
        else:
            feats = feats.reshape(batch, n, w * c)
        return torch.matmul(feats, matrix) + bias

    def _dil_window(self, new: Tensor, position: Tensor, ring: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """f_dil's input window from its ring (B, R, C) and the step's new frames (B, n, C), or
        one_frame (B, 1, 1, C) -> (window (B, 1, T, C), next ring (B, R, C), the conv's
        time/width dilation over the window).

        Ring rows by stream position (row q mod R: frame q), so that the one-frame step can read
        its K - 1 taps in place (one Gather of K - 1 rows, ``dil_taps``) and write one row
        (ScatterElements, whose new row ``OnnxStream`` writes into its ring itself), where a
        time-ordered history would cost a Concat of R + 1 rows and a Slice of R per step plus an
        R-row state output. The window is then the K taps, dilation 1.
        n frames: the window is the R ring rows in time order then the new ones, (B, R + n, C),
        and the next ring is gathered from the same rows (two Gathers where the time-ordered
        history took a Concat and a Slice; per-stream positions, so one flat Gather each)."""
        t = self.model.temporal
        r, c = t.context_frames, t.channels
        streams = torch.arange(position.shape[0], dtype=position.dtype)
        if self.one_frame:
            offsets = torch.tensor(self.dil_taps(), dtype=position.dtype)
            taps = ((position[:, None] + offsets) % r + (streams * r)[:, None])[:, None]  # (B, 1, K - 1): dil_taps
            # 4-D throughout: no Unsqueeze node before the conv.
            window = torch.cat([F.embedding(taps, ring.reshape(-1, c)), new], dim=2)  # (B, 1, K, C)
            slot = (position % r)[:, None, None, None].expand(-1, 1, 1, c)
            return window, ring[:, None].scatter(2, slot, new)[:, 0], (1, 1)
        n = new.shape[1]
        rows = torch.cat([ring, new], dim=1).reshape(-1, c)  # (B (R + n), C)
        base = (streams * (r + n))[:, None]
        i = torch.arange(r + n, dtype=position.dtype)
        read = torch.where(i < r, (position[:, None] + i) % r, i) + base  # (B, R + n): time order
        s = torch.arange(r, dtype=position.dtype)
        # Ring row s after the step holds frame q = p + n - R + ((s - p - n) mod R): the frame
        # row s already held when q < p, else a new one (row R + q - p of rows). (Less, not
        # GreaterOrEqual: the steady variants hold no op of the masks', which tests check.)
        ahead = (s - position[:, None] - n) % r + (n - r)  # q - p
        write = torch.where(ahead < 0, s, ahead + r) + base
        return F.embedding(read, rows)[:, None], F.embedding(write, rows), (t.dilation, 1)


def _branch(proto, prefix: str, inputs: set[str]):
    """The graph of an exported ModelProto as an If branch: no inputs (it reads the outer
    graph's), every other name prefixed so the two branches cannot collide. Each branch keeps
    its own copy of the weights: onnxruntime's layout optimisations (NCHWc convolutions, 2.5x
    faster here) only take weights that are initializers of the same graph, not outer-scope ones.
    Weights the exporter left as Constant nodes become initializers too, for the same reason."""
    import onnx
    from onnx import numpy_helper

    g = proto.graph
    inits = []
    renamed: dict[str, str] = {}

    def name(x: str) -> str:
        if not x or x in inputs:
            return x
        return renamed.setdefault(x, f"{prefix}/{x}")

    for init in g.initializer:
        inits.append(numpy_helper.from_array(numpy_helper.to_array(init), name(init.name)))
    nodes = []
    for node in g.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and np.prod(value.dims) >= 64:
            inits.append(numpy_helper.from_array(numpy_helper.to_array(value), name(node.output[0])))
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportError(f"cannot nest the exported node {node.op_type} ({node.name}) in an If branch")
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = f"{prefix}/{node.name}"
        new.input[:] = [name(x) for x in node.input]
        new.output[:] = [name(x) for x in node.output]
        nodes.append(new)
    outputs = []
    for out in g.output:
        value = onnx.ValueInfoProto()
        value.CopyFrom(out)
        value.name = name(out.name)
        outputs.append(value)
    return onnx.helper.make_graph(nodes, prefix, [], outputs, inits)


# Names of the one-frame variant's tap rows (B, 1, K - 1) (flat indices into the ring's B R rows)
# and of its new f_dil frame (B, 1, 1, C): OnnxStream feeds the first and writes the second into
# its ring itself. DIL_READ / DIL_WRITE: the n-frame variants' Gather indices (B, R + n) and
# (B, R) into the ring's rows and the new frames (StepGraph._dil_window), fed by OnnxStream to
# its steady session: computing them in the graph took some 20 index nodes per step.
DIL_TAPS, DIL_NEW, DIL_READ, DIL_WRITE = "dil_taps", "dil_history_new", "dil_read", "dil_write"


def window_name(state: str) -> str:
    """The one-frame variant's name for a CNN block's window: its history and the new frame,
    (B, K, F, C) or, block 0, (B, 1, K, F), whose last K - 1 frames are ``<state>_out``."""
    return f"{state}_window"


def _name_one_frame_values(proto) -> None:
    """Give the one-frame export's tap indices and new f_dil frame the fixed names DIL_TAPS and
    DIL_NEW: the indices of the Gather that reads the flattened ``dil_history``, and the updates
    of the ScatterElements that makes ``dil_history_out``; and each block's window (the Concat
    that ``<block>_history_out`` is sliced from) ``window_name(<block>_history)``."""
    g = proto.graph
    _name_windows(proto)
    producer = {o: n for n in g.node for o in n.output}
    gather = [n for n in g.node if n.op_type == "Gather" and n.input[0] in producer
              and producer[n.input[0]].op_type == "Reshape" and producer[n.input[0]].input[0] == "dil_history"]
    scatter = [n for n in g.node if n.op_type == "ScatterElements"]
    if len(gather) != 1 or len(scatter) != 1:
        raise ExportError("the one-frame step graph lost its dil_history Gather/ScatterElements (exporter change?)")
    _rename(g, {gather[0].input[1]: DIL_TAPS, scatter[0].input[2]: DIL_NEW})


def _name_windows(proto) -> None:
    """Name each CNN block's window in a steady export ``window_name(<block>_history)``: the
    Concat of history and new frames that ``<block>_history_out`` is sliced from."""
    g = proto.graph
    _rename(g, {n.input[0]: window_name(n.output[0][:-len("_out")]) for n in g.node
                if n.op_type == "Slice" and n.output[0].startswith("block") and n.output[0].endswith("_history_out")})


def _name_ring_indices(proto) -> None:
    """Give an n-frame export's two Gathers over the ring rows and new frames their indices'
    fixed names: DIL_WRITE for the one that makes ``dil_history_out``, DIL_READ for the other."""
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}

    def reads_ring(n) -> bool:
        src = producer.get(n.input[0])
        src = producer.get(src.input[0]) if src is not None and src.op_type == "Reshape" else None
        return src is not None and src.op_type == "Concat" and src.input[0] == "dil_history"

    gathers = [n for n in g.node if n.op_type == "Gather" and reads_ring(n)]
    write = [n for n in gathers if n.output[0] == "dil_history_out"]
    if len(gathers) != 2 or len(write) != 1:
        raise ExportError("the step graph lost its dil_history Gathers (exporter change?)")
    read = next(n for n in gathers if n is not write[0])
    _rename(g, {read.input[1]: DIL_READ, write[0].input[1]: DIL_WRITE})


def _rename(g, rename: dict[str, str]) -> None:
    for n in g.node:
        n.input[:] = [rename.get(x, x) for x in n.input]
        n.output[:] = [rename.get(x, x) for x in n.output]


def _with_steady_branch(masked, steady, lookahead: int, one_frame=None):
    """One step graph from two exports of it: ``If(every stream past its lookahead and none
    ended) steady else masked``. Same inputs, outputs and metadata as ``masked``. Given a third,
    ``one_frame``, the steady branch is ``If(frames.shape[1] == 1) one_frame else steady``."""
    import onnx
    from onnx import TensorProto, helper

    inputs = {i.name for i in masked.graph.input}
    then_branch = _branch(steady, "steady", inputs | {DIL_READ, DIL_WRITE})
    else_branch = _branch(masked, "masked", inputs)
    int64 = TensorProto.INT64
    if one_frame is not None:
        one_branch = _branch(one_frame, "steady1", inputs | {DIL_TAPS, DIL_NEW})
        inner = [f"steady_n/{o.name}" for o in masked.graph.output]
        then_branch = helper.make_graph([
            helper.make_node("Shape", ["frames"], ["steady_n/shape"]),
            helper.make_node("Constant", [], ["steady_n/axis"], value=helper.make_tensor("", int64, [], [1])),
            helper.make_node("Gather", ["steady_n/shape", "steady_n/axis"], ["steady_n/frames"], axis=0),
            helper.make_node("Equal", ["steady_n/frames", "steady_n/axis"], ["steady_n/one"]),
            helper.make_node("If", ["steady_n/one"], inner, then_branch=one_branch, else_branch=then_branch),
        ], "steady_n", [], [helper.make_value_info(name, o.type) for name, o in zip(inner, masked.graph.output)])
    nodes = [
        # min(position + NO_END - lookahead, end) >= NO_END  <=>  position >= lookahead and
        # end >= NO_END (not ended) for every stream; position + NO_END stays far below 2**63.
        helper.make_node("Constant", [], ["no_end_minus_lookahead"],
                         value=helper.make_tensor("", int64, [], [NO_END - lookahead])),
        helper.make_node("Constant", [], ["no_end"], value=helper.make_tensor("", int64, [], [NO_END])),
        helper.make_node("Add", ["position", "no_end_minus_lookahead"], ["started_at"]),
        helper.make_node("Min", ["started_at", "end"], ["steady_from"]),
        helper.make_node("ReduceMin", ["steady_from"], ["first_steady"], keepdims=0),
        helper.make_node("GreaterOrEqual", ["first_steady", "no_end"], ["steady_state"]),
        helper.make_node("If", ["steady_state"], [o.name for o in masked.graph.output],
                         then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(nodes, masked.graph.name, list(masked.graph.input), list(masked.graph.output))
    model = helper.make_model(graph, opset_imports=list(masked.opset_import), producer_name=masked.producer_name,
                              producer_version=masked.producer_version)
    model.ir_version = masked.ir_version
    onnx.checker.check_model(model)
    return model


def steady_step_model(proto, outputs: list[str] | None = None, one_frame: bool = False):
    """The steady-state branch of a step graph exported with one (``_with_steady_branch``), as a
    model of its own: valid for steps in which every stream is past its lookahead and none has
    ended (what the If would choose it for). With the whole graph's inputs and outputs, or, given
    ``outputs``, only those outputs, the nodes they need and the inputs those read (onnxruntime
    runs every node of a graph whatever outputs a run asks for, and wants every input fed).

    Where the steady branch has a one-frame variant (``steady-if-1``): the n-frame one, or with
    ``one_frame`` the one-frame one, valid only for one-frame steps. Its ``outputs`` may then
    name DIL_NEW, the new f_dil frame (B, 1, 1, C), which ring row position mod R of
    ``dil_history`` takes, and the blocks' windows (``window_name``), whose last K - 1 frames
    are the next histories. Where they need DIL_TAPS it is an input, (B, 1, K - 1) int64 flat rows
    b R + (position[b] + o) mod R of the ring for o in the file's ``taps`` (rtsed_state).
    Likewise the n-frame variant's DIL_READ and DIL_WRITE (``StepGraph._dil_window``)."""
    import onnx
    from onnx import TensorProto, helper

    proto = inline_shared_weights(proto)  # the branch's weights as its own initializers
    node = next((n for n in proto.graph.node if n.op_type == "If"), None)
    if node is None:
        raise ExportError("not a step graph with a steady-state branch (no If node)")
    branch = next(a.g for a in node.attribute if a.name == "then_branch")
    rename = {inner.name: outer for inner, outer in zip(branch.output, node.output)}
    nested = next((n for n in branch.node if n.op_type == "If"), None)
    if nested is not None:  # steady-if-1: If(one frame) one-frame variant else n-frame one
        branch = next(a.g for a in nested.attribute if a.name == ("then_branch" if one_frame else "else_branch"))
        rename = {inner.name: rename[outer] for inner, outer in zip(branch.output, nested.output)}
    elif one_frame:
        raise ExportError("the step graph has no one-frame steady variant (export it with this rtsed)")
    nodes = []
    for n in branch.node:
        new = onnx.NodeProto()
        new.CopyFrom(n)
        new.output[:] = [rename.get(x, x) for x in n.output]
        new.input[:] = [rename.get(x, x) for x in n.input]
        nodes.append(new)
    graph_inputs, graph_outputs = list(proto.graph.input), list(proto.graph.output)
    initializers = list(branch.initializer)
    if outputs is not None:
        # Values inside the branch by their exported names (the branch prefixes them).
        produced = {o.split("/", 1)[-1]: o for n in nodes for o in n.output}
        internal = {produced[name]: name for name in outputs if name in (DIL_NEW,) or name.endswith("_window")
                    if name in produced and name not in {o.name for o in graph_outputs}}
        for n in nodes:
            n.input[:] = [internal.get(x, x) for x in n.input]
            n.output[:] = [internal.get(x, x) for x in n.output]
        graph_outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in internal.values()]
        unknown = set(outputs) - {o.name for o in graph_outputs}
        if unknown:
            raise ExportError(f"the step graph has no output(s) {sorted(unknown)}")
        needed, kept = set(outputs), []
        fed = {DIL_TAPS} if one_frame else {DIL_READ, DIL_WRITE}  # inputs, not computed
        for n in reversed(nodes):  # nodes are topologically sorted: one backward sweep
            if needed & set(n.output) and not fed & set(n.output):
                kept.append(n)
                needed |= {x for x in n.input if x}
        nodes = kept[::-1]
        graph_inputs = [i for i in graph_inputs if i.name in needed]
        graph_inputs += [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", 1, None] if name == DIL_TAPS
                                                       else ["batch", None]) for name in sorted(fed & needed)]
        graph_outputs = [next(o for o in graph_outputs if o.name == name) for name in outputs]
        initializers = [i for i in initializers if i.name in needed]
    graph = helper.make_graph(nodes, branch.name, graph_inputs, graph_outputs, initializers)
    model = helper.make_model(graph, opset_imports=list(proto.opset_import))
    model.ir_version = proto.ir_version
    return model


def check_exportable(model: SEDModel, config: DetectorConfig) -> None:
    if config.model != model.config:
        raise ExportError(f"the checkpoint's config describes {config.model.name}, its weights {model.name}")
    if next(model.parameters()).dtype != torch.float32:
        raise ExportError("export needs float32 weights; call model.float() first")
    if os.environ.get("RTSED_KERNELS", "auto").lower() == "triton":
        raise ExportError("RTSED_KERNELS=triton: fused Triton kernels have no ONNX form; export with "
                          "RTSED_KERNELS=ref or auto (the graph uses the reference ops)")


def export_onnx(model: SEDModel, config: DetectorConfig, out: str | Path, streaming: bool = False,
                opset: int = OPSET, transform=None, metadata: dict[str, str] | None = None,
                channels_last_head: bool = False) -> Path:
    """Write the offline (or, with streaming=True, the step) graph of a model to ``out``.

    ``transform(proto, variant) -> proto``, when given, rewrites each traced graph before the
    step variants are joined: variant is "offline", "masked", "steady" or "one_frame" (the
    one-frame steady variant, n == 1). rtsed.stream.onnx_quantize quantizes them this way.
    ``metadata``: more (key, value) pairs for the file's metadata. ``channels_last_head``: the
    step graph's classifier as a MatMul over channels-last f_dil output (``StepGraph``; what int8
    graphs want)."""
    import onnx  # imported here: onnx is only needed to export

    check_exportable(model, config)
    # A CPU copy in eval mode: the caller's model stays where it is (on its GPU, in its mode).
    model = copy.deepcopy(model).cpu().eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_mels = config.model.n_mels
    meta = {
        "rtsed_format": ONNX_FORMAT,
        "rtsed_format_version": str(ONNX_FORMAT_VERSION),
        "rtsed_config": json.dumps(config.to_dict()),
        "rtsed_graph": "step" if streaming else "offline",
        "rtsed_lookahead_frames": str(model.lookahead_frames),
        "rtsed_hop_s": repr(config.frontend.hop_s),
    }
    if streaming:
        graph = StepGraph(model, config, channels_last_head=channels_last_head).eval()
        specs = graph.state_specs()
        state_names = [name for name, _ in specs]
        args = (torch.zeros(2, 3, n_mels), torch.zeros(2, dtype=torch.int64),
                torch.full((2,), NO_END, dtype=torch.int64), *graph.initial_states(2))
        inputs = ["frames", "position", "end", *state_names]
        outputs = ["probabilities", "logits", "frame_index", "valid", "position_out",
                   *[f"{n}_out" for n in state_names]]
        dynamic = {"frames": {0: "batch", 1: "frames"}, "position": {0: "batch"}, "end": {0: "batch"},
                   "probabilities": {0: "batch", 1: "frames"}, "logits": {0: "batch", 1: "frames"},
                   "frame_index": {0: "batch", 1: "frames"}, "valid": {0: "batch", 1: "frames"},
                   "position_out": {0: "batch"}}
        for name, shape in specs:
            axis = shape.index("batch")
            dynamic[name] = {axis: "batch"}
            dynamic[f"{name}_out"] = {axis: "batch"}
        # dil_history is a ring (StepGraph._dil_window): row q mod R holds the frame of stream
        # position q; "taps" are the offsets o of a one-frame step's rows (position + o) mod R.
        # time_axis: the axis of each history's frames (2 for a one-channel block's (B, 1, K - 1, F)).
        blocks = {f"block{i}_history": block for i, block in enumerate(model.blocks)}
        meta["rtsed_state"] = json.dumps([
            {"name": n, "shape": list(s), "time_axis": 2 if blocks[n].in_channels == 1 else 1} if n in blocks else
            {"name": n, "shape": list(s), "time_axis": 1, "layout": "ring: row q mod R holds stream position q's frame",
             "taps": graph.dil_taps()} if n == "dil_history" and isinstance(model.temporal, DilatedTemporal) else
            {"name": n, "shape": list(s)} for n, s in specs])
        meta["rtsed_no_end"] = str(NO_END)
    else:
        graph = OfflineGraph(model, config).eval()
        args = (torch.zeros(2, 8, n_mels),)
        inputs, outputs = ["logmel"], ["probabilities", "logits"]
        dynamic = {"logmel": {0: "batch", 1: "frames"}, "probabilities": {0: "batch", 1: "frames"},
                   "logits": {0: "batch", 1: "frames"}}

    def trace(module: nn.Module):
        buffer = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter (dynamo=False) is deliberate: the dynamo one needs onnxscript and
            # gains nothing here. Its GRU batch-size warning is covered by tests at several batch sizes.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*batch_size other than 1.*GRU.*")
            warnings.filterwarnings("ignore", message=".*Constant folding.*")
            # Shape checks become trace-time constants; dynamic batch and frame counts are tested.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(module, args, buffer, input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic, opset_version=opset, dynamo=False)
        return onnx.load_from_string(buffer.getvalue())

    with torch.no_grad():
        graph(*args)  # folds the BNs into the weights once (the layers' fold caches): constants in the trace
    proto = trace(graph)

    def rewrite(p, variant: str):
        return p if transform is None else transform(p, variant)

    if not streaming or opset < 13:
        proto = rewrite(proto, "offline" if not streaming else "masked")
    if streaming and opset >= 13:  # ReduceMin over int64 and GreaterOrEqual need opset 13
        steady = trace(StepGraph(model, config, steady=True, channels_last_head=channels_last_head).eval())
        one_frame = None
        if isinstance(model.temporal, DilatedTemporal):
            _name_ring_indices(steady)
            args = (args[0][:, :1], *args[1:])  # traced at n = 1: the variant only serves n == 1
            one_frame = trace(StepGraph(model, config, one_frame=True, channels_last_head=channels_last_head).eval())
            _name_one_frame_values(one_frame)
            one_frame = rewrite(one_frame, "one_frame")
        proto = _with_steady_branch(rewrite(proto, "masked"), rewrite(steady, "steady"), model.lookahead_frames,
                                    one_frame)
        share_weights(proto)
        meta["rtsed_step_variants"] = "steady-if" if one_frame is None else "steady-if-1"
    meta.update(metadata or {})
    meta["rtsed_content_sha256"] = graph_digest(proto)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"rtsed {config.model.name} ({meta['rtsed_graph']} graph); labels: {', '.join(config.labels)}"
    return write_atomically(out, lambda f: f.write(proto.SerializeToString()), binary=True, what="ONNX file")


# Constants of at least this many bytes held more than once (by several step variants, or
# twice by one: e.g. the all-zero zero points of int8 weights) are stored once.
SHARED_MIN_BYTES = 64
SHARED_PREFIX = "shared/"


def _subgraphs(graph):
    """Every graph nested in ``graph`` (If branches, at any depth), outermost first."""
    import onnx

    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield a.g
                yield from _subgraphs(a.g)


def share_weights(proto) -> None:
    """Store each weight that several step variants (If branches) hold once, in place: as an
    initializer of the outer graph named ``shared/<i>``, which the branches read as an outer-scope
    value. The three variants of a step graph carry the same weights (in int8 graphs too: each
    variant quantizes the same fp32 weights per channel to the same int8 values and scales), so
    this takes a file to about a third. onnxruntime lays weights out for its fast kernels only
    when they are initializers of the graph that uses them (``_branch``), so the loader copies
    them back into each branch (``inline_shared_weights``) before it builds a session."""
    branches = list(_subgraphs(proto.graph))
    holders: dict[tuple, list] = {}
    for g in branches:
        for init in g.initializer:
            if len(init.raw_data) >= SHARED_MIN_BYTES:
                holders.setdefault((init.data_type, tuple(init.dims), init.raw_data), []).append((g, init))
    for key, held in holders.items():
        if len(held) < 2:
            continue
        name = f"{SHARED_PREFIX}{len(proto.graph.initializer)}"
        shared = proto.graph.initializer.add()
        shared.CopyFrom(held[0][1])
        shared.name = name
        for g, init in held:
            old = init.name
            g.initializer.remove(init)
            for node in g.node:
                node.input[:] = [name if x == old else x for x in node.input]


def inline_shared_weights(proto):
    """A copy of ``proto`` with every shared weight (``share_weights``) copied into each graph
    that reads it, under a name of that graph's, and gone from the outer graph: what onnxruntime
    needs to lay them out for its fast kernels. A file without shared weights comes back as is."""
    import onnx

    shared = {init.name: init for init in proto.graph.initializer if init.name.startswith(SHARED_PREFIX)}
    if not shared:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for g in _subgraphs(out.graph):
        local: dict[str, str] = {}
        for node in g.node:
            for i, x in enumerate(node.input):
                if x in shared:
                    if x not in local:
                        local[x] = f"{g.name}/{x}"
                        init = g.initializer.add()
                        init.CopyFrom(shared[x])
                        init.name = local[x]
                    node.input[i] = local[x]
    kept = [init for init in out.graph.initializer if init.name not in shared]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def graph_digest(proto) -> str:
    """SHA-256 (hex) of a model's serialized graph: its nodes, weights and subgraphs. The metadata
    that records it lies outside the graph, so recording it does not change it."""
    return hashlib.sha256(proto.graph.SerializeToString()).hexdigest()


def float_weights(proto) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every floating-point constant of a model: initializers and Constant
    tensors, subgraphs (the step graph's If branches) included."""
    import onnx
    from onnx import numpy_helper

    def walk(graph):
        for t in graph.initializer:
            yield t
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from walk(g)

    for t in walk(proto.graph):
        array = numpy_helper.to_array(t)
        if array.dtype.kind == "f":
            yield t.name, array
