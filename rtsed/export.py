"""ONNX export: an offline graph and a streaming step graph, self-described by metadata.

    python -m rtsed.export --model X.pt --out X.onnx              offline: log-mel (B, T, F) -> probabilities
    python -m rtsed.export --model X.pt --out X.onnx --streaming  step: (frames, position, end, states) -> (...)

Both graphs take raw log-mel frames (the front end's output) and normalise inside, so a consumer
needs only the file: the metadata carries the detector config (front end, model, labels,
normalisation, decoder) as JSON, the state tensors' names and shapes, and the lookahead.

The step graph is ``ModelStream.step`` written without in-place state: every state tensor is an
input and its update an output (``<name>`` -> ``<name>_out``). It keeps f_dil's past frames by
concatenation rather than ModelStream's ring buffer, because an ONNX graph has no in-place
memory; the arithmetic is otherwise the same. Step protocol (per stream b of the batch):

- ``position[b]``: frames this stream has consumed, 0 at its start (feed back ``position_out``);
- ``end[b]``: ``NO_END`` while the stream runs; to finish, set it to the stream's ``position``
  and feed ``lookahead_frames`` more frames (any values: they are treated as offline padding);
- outputs ``frame_index`` (B, n) and ``valid`` (B, n): which offline frame each output row is,
  and whether it is a real one (rows before the lookahead has filled, or after the end, are not).

The step is in the file twice, behind one If (opset 13 up): the masked step above for batches in
which some stream is still inside its first ``lookahead_frames`` or has ended, and a steady-state
step without the masks (all ones then) for the rest. Same inputs, outputs and arithmetic;
``rtsed.onnx_backend.OnnxStream`` runs the steady branch as a session of its own
(``steady_step_model``), skipping the If's own cost.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtsed import ops
from rtsed.checkpoint import CheckpointError, load_checkpoint
from rtsed.config import DetectorConfig, NormalizationStats
from rtsed.layers import DilatedTemporal, GRUTemporal
from rtsed.model import SEDModel
from rtsed.streaming import NO_END

ONNX_FORMAT = "rtsed-onnx"
ONNX_FORMAT_VERSION = 1
OPSET = 17
# Bumped whenever the exported step graph changes shape or speed, so that caches keyed on a
# checkpoint (rtsed.engine.exported_step_graph) export again instead of serving an old graph.
STEP_GRAPH_REVISION = 3


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
    nodes onnxruntime ran per step, ~7 % of a one-frame step."""

    def __init__(self, model: SEDModel, config: DetectorConfig, steady: bool = False):
        super().__init__()
        self.model, self.normalize = model, _Normalize(config)
        self.steady = steady
        self.block_delays, total = [], 0
        for block in model.blocks:
            total += block.right_pad
            self.block_delays.append(total)
        self.cnn_delay = total
        self.lookahead = total + model.temporal.right_pad

    def state_specs(self) -> list[tuple[str, tuple[int | str, ...]]]:
        """[(name, shape)] of every state tensor, "batch" standing for the batch size.

        A block's past input frames are kept channels-last, (B, K - 1, F, C_in), where the block
        reads more than one channel: there the new frames join them as one contiguous copy per
        stream (Concat on axis 1) and the next history is one contiguous Slice, where NCHW
        histories (B, C_in, K - 1, F) took C_in strided pieces each; onnxruntime folds the two
        permutes into the reorders to and from its blocked conv layout that it runs anyway.
        Measured 167.8 -> 162.6 us per one-frame dnd_7_10 step (1 thread), 16 frames unchanged.
        Block 0 (one channel, where both layouts are the same memory) keeps (B, 1, K - 1, F)."""
        specs, freq = [], self.model.config.n_mels
        for i, block in enumerate(self.model.blocks):
            if block.in_channels == 1:
                specs.append((f"block{i}_history", ("batch", 1, block.context_frames, freq)))
            else:
                specs.append((f"block{i}_history", ("batch", block.context_frames, freq, block.in_channels)))
            freq //= block.pool.kernel_size[1]
        t = self.model.temporal
        if isinstance(t, GRUTemporal):
            specs.append(("gru_h", (1, "batch", t.gru.hidden_size)))
        else:
            specs.append(("dil_history", ("batch", t.context_frames, t.channels)))
        return specs

    def initial_states(self, batch_size: int) -> list[Tensor]:
        return [torch.zeros([batch_size if d == "batch" else d for d in shape]) for _, shape in self.state_specs()]

    def forward(self, frames: Tensor, position: Tensor, end: Tensor, *states: Tensor):
        n = frames.shape[1]
        pos = position[:, None] + torch.arange(n, dtype=position.dtype)[None, :]  # (B, n)

        def keep(delay: int) -> Tensor:
            t = pos - delay
            return ((t >= 0) & (t < end[:, None])).to(frames.dtype)[:, None, :, None]

        h = self.normalize(frames).unsqueeze(1)
        if not self.steady:
            h = h * keep(0)
        new_states = []
        for block, delay, hist in zip(self.model.blocks, self.block_delays, states):
            if block.in_channels == 1:
                window = torch.cat([hist, h], dim=2)
                # A negative start: one constant Slice, no Shape/Gather/Sub to compute it.
                new_states.append(window[:, :, -block.context_frames:])
            else:  # channels-last history (B, ctx, F, C), see state_specs
                window = torch.cat([hist, h.permute(0, 2, 3, 1)], dim=1)
                new_states.append(window[:, -block.context_frames:])
                window = window.permute(0, 3, 1, 2)
            h = block.valid_time(window)
            if delay and not self.steady:
                h = h * keep(delay)
        t = self.model.temporal
        temporal_state = states[len(self.model.blocks)]
        if isinstance(t, GRUTemporal):
            skip = None
            if not self.steady:  # steady: every stream is past the CNN delay, nothing to skip
                skip = torch.clamp(self.cnn_delay - position, min=0)
                skip = torch.minimum(skip, torch.full_like(skip, n))
            feats, new_h = t.step_tensors(h.permute(0, 2, 3, 1).squeeze(2), temporal_state, skip)
            new_states.append(new_h)
            logits = self.model.classifier(feats)
        else:
            assert isinstance(t, DilatedTemporal)
            window = torch.cat([temporal_state, h.permute(0, 2, 3, 1).squeeze(2)], dim=1)  # (B, R + n, C)
            new_states.append(window[:, -t.context_frames:])
            y = F.conv2d(window.unsqueeze(1), t.conv.weight, t.conv.bias, stride=(1, t.stride),
                         dilation=(t.dilation, 1))
            if ops.eval_fast_path(t, y):  # BN folded into the classifier, as ModelStream does
                # t.conv_to_logits, with its output taken to (B, n, C) as a permute that
                # onnxruntime folds into the Conv's output reorder (no Squeeze/Transpose nodes).
                weight, bias = t.folded_classifier(self.model.classifier)
                kernel = weight.view(weight.shape[0], t.conv.out_channels, 1, t.width)
                logits = F.conv2d(F.relu(y), kernel, bias).permute(0, 2, 3, 1).squeeze(2)
            else:
                logits = self.model.classifier(t._flatten(t.bn(F.relu(y))))
        frame_index = pos - self.lookahead
        if self.steady:  # frame_index >= 0 for every row
            valid = frame_index < end[:, None]
        else:
            valid = (frame_index >= 0) & (frame_index < end[:, None])
        return (torch.sigmoid(logits), logits, frame_index, valid, position + n, *new_states)


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


def _with_steady_branch(masked, steady, lookahead: int):
    """One step graph from two exports of it: ``If(every stream past its lookahead and none
    ended) steady else masked``. Same inputs, outputs and metadata as ``masked``."""
    import onnx
    from onnx import TensorProto, helper

    inputs = {i.name for i in masked.graph.input}
    then_branch = _branch(steady, "steady", inputs)
    else_branch = _branch(masked, "masked", inputs)
    int64 = TensorProto.INT64
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


def steady_step_model(proto, outputs: list[str] | None = None):
    """The steady-state branch of a step graph exported with one (``_with_steady_branch``), as a
    model of its own: valid for steps in which every stream is past its lookahead and none has
    ended (what the If would choose it for). With the whole graph's inputs and outputs, or, given
    ``outputs``, only those outputs, the nodes they need and the inputs those read (onnxruntime
    runs every node of a graph whatever outputs a run asks for, and wants every input fed)."""
    import onnx
    from onnx import helper

    node = next((n for n in proto.graph.node if n.op_type == "If"), None)
    if node is None:
        raise ExportError("not a step graph with a steady-state branch (no If node)")
    branch = next(a.g for a in node.attribute if a.name == "then_branch")
    rename = {inner.name: outer for inner, outer in zip(branch.output, node.output)}
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
        unknown = set(outputs) - {o.name for o in graph_outputs}
        if unknown:
            raise ExportError(f"the step graph has no output(s) {sorted(unknown)}")
        needed, kept = set(outputs), []
        for n in reversed(nodes):  # nodes are topologically sorted: one backward sweep
            if needed & set(n.output):
                kept.append(n)
                needed |= {x for x in n.input if x}
        nodes = kept[::-1]
        graph_inputs = [i for i in graph_inputs if i.name in needed]
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
                opset: int = OPSET) -> Path:
    """Write the offline (or, with streaming=True, the step) graph of a model to ``out``."""
    import onnx  # imported here: onnx is only needed to export

    check_exportable(model, config)
    model = model.cpu().eval()
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
        graph = StepGraph(model, config).eval()
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
        meta["rtsed_state"] = json.dumps([{"name": n, "shape": list(s)} for n, s in specs])
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
        graph(*args)  # folds the BNs into the weights once (layers.folded_cache): constants in the trace
    proto = trace(graph)
    if streaming and opset >= 13:  # ReduceMin over int64 and GreaterOrEqual need opset 13
        steady = trace(StepGraph(model, config, steady=True).eval())
        proto = _with_steady_branch(proto, steady, model.lookahead_frames)
        meta["rtsed_step_variants"] = "steady-if"
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"rtsed {config.model.name} ({meta['rtsed_graph']} graph); labels: {', '.join(config.labels)}"
    onnx.save(proto, str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rtsed.export", description="Export a checkpoint to ONNX.")
    p.add_argument("--model", required=True, help="checkpoint path (.pt)")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--streaming", action="store_true", help="export the streaming step graph")
    p.add_argument("--opset", type=int, default=OPSET)
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-torch check after export")
    args = p.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.model)
        out = export_onnx(ckpt.model, ckpt.config, args.out, streaming=args.streaming, opset=args.opset)
    except (CheckpointError, ExportError) as exc:
        print(f"rtsed.export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {'step' if args.streaming else 'offline'} graph, "
          f"{ckpt.config.model.name}, {len(ckpt.config.labels)} classes)")
    if not args.no_check:
        from rtsed.onnx_backend import check_against_torch

        worst = check_against_torch(out, ckpt.model)
        print(f"onnxruntime vs torch on random input: max |diff| of logits {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
