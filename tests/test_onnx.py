"""ONNX export and the onnxruntime backend: parity with torch (docs/streaming.md's parity rule on logits),
offline and streamed over many chunks of varying size, and clear errors for bad files/states."""

import json
import zlib

import numpy as np
import onnx
import pytest
import torch

import rtsed
from rtsed.backends import dispatch
from rtsed.config import DetectorConfig, FrontendConfig, ModelConfig, NormalizationStats
from rtsed.cli.export import main as export_main
from rtsed.stream.onnx_export import ExportError, StepGraph, export_onnx, steady_step_model
from rtsed.models.layers import DilatedTemporal
from rtsed.stream.onnx_runtime import OnnxModelError, OnnxOffline, OnnxStream

ATOL, RTOL = 1e-5, 1e-4


def assert_parity(got, ref):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape
    excess = np.abs(got - ref) - (ATOL + RTOL * np.abs(ref))
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 0, f"parity broken at {worst}: {got[worst]} vs {ref[worst]}"


def randomised(name: str, n_classes: int = 6) -> tuple[rtsed.SEDModel, DetectorConfig]:
    """A model with non-trivial BatchNorm statistics (zero-masking bugs would show) and a config
    with non-identity normalisation (the graph must normalise inside)."""
    torch.manual_seed(zlib.crc32(name.encode()))  # str hash() differs per process
    config = DetectorConfig(
        frontend=FrontendConfig.for_rate(16000),
        model=ModelConfig.from_name(name, n_classes=n_classes),
        labels=tuple(f"c{i}" for i in range(n_classes)),
        normalization=NormalizationStats(mean=tuple(np.linspace(-8, -2, 40)), std=tuple(np.linspace(1, 3, 40))),
    )
    model = rtsed.SEDModel(config.model).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1.0, 0.3)
            m.bias.data.normal_(0.0, 0.3)
    return model, config


def raw_logmel(config: DetectorConfig, frames: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    norm = config.normalization
    return (rng.standard_normal((batch, frames, 40)) * np.asarray(norm.std) + np.asarray(norm.mean)).astype(np.float32)


def torch_logits(model, config, logmel: np.ndarray) -> np.ndarray:
    norm = config.normalization
    x = (logmel - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)
    with torch.no_grad():
        return model(torch.from_numpy(x.astype(np.float32))).numpy()


MODELS = ["base", "dnd_7_10", "dnd_7_10_causal", "dil_3_10"]


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory):
    model, config = randomised(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    offline = export_onnx(model, config, folder / "offline.onnx")
    step = export_onnx(model, config, folder / "step.onnx", streaming=True)
    return model, config, offline, step


def test_offline_graph_matches_torch(exported):
    model, config, offline, _ = exported
    logmel = raw_logmel(config, 150, batch=2)
    runner = OnnxOffline(offline)
    assert runner.config == config
    assert_parity(runner.logits(logmel), torch_logits(model, config, logmel))
    # Dynamic frames: another length through the same graph.
    logmel = raw_logmel(config, 61, seed=1)
    assert_parity(runner.logits(logmel), torch_logits(model, config, logmel))


@pytest.mark.parametrize("chunks", ["ones", "varying", "sixteens"])
def test_step_graph_streams_like_offline(exported, chunks):
    model, config, _, step = exported
    total = 230
    logmel = raw_logmel(config, total, seed=2)
    ref = torch_logits(model, config, logmel)[0]
    rng = np.random.default_rng(3)
    sizes = {"ones": [1] * 60 + [total - 60], "sixteens": [16] * 15,
             "varying": list(rng.integers(1, 20, size=40))}[chunks]
    stream = OnnxStream(step)
    assert stream.lookahead_frames == model.lookahead_frames
    parts, start = [], 0
    for size in sizes:
        parts.append(stream.push(logmel[0, start:start + size]))
        start += size
    parts.append(stream.push(logmel[0, start:]))
    parts.append(stream.flush())
    got = np.concatenate(parts)
    assert_parity(got, ref)
    assert np.std(ref) > 0.02  # not a trivially constant output


def test_step_graph_batched_streams_reset_independently(exported):
    """Three streams in one session, one reset mid-way and one ended early: each stream's valid
    rows equal its own offline output (the GRU's warm-up skip included)."""
    model, config, _, step = exported
    length, size = 120, 8  # the signal length is a multiple of the step, so ends fall between steps
    signals = [raw_logmel(config, length, seed=s)[0] for s in (10, 11, 12)]
    stream = OnnxStream(step, batch_size=3)
    collected = [dict() for _ in range(3)]
    starts = [0, 0, 0]
    for i in range(0, 200, size):
        if i == 40:
            stream.reset([1])  # stream 1 restarts its signal from frame 0 while the others go on
            starts[1] = 0
            collected[1].clear()
        frames = np.zeros((3, size, 40), np.float32)
        for b in range(3):
            if starts[b] >= length and stream.ends[b] == stream.no_end:
                stream.end([b])  # from now on this stream's frames are offline padding
            chunk = signals[b][starts[b]:starts[b] + size]
            frames[b, :len(chunk)] = chunk
            starts[b] += size
        out = stream.step(frames)
        for b in range(3):
            for j in np.flatnonzero(out.valid[b]):
                collected[b][int(out.frame_index[b, j])] = out.logits[b, j]
    for b in range(3):
        ref = torch_logits(model, config, signals[b][None])[0]
        assert sorted(collected[b]) == list(range(length))
        got = np.stack([collected[b][t] for t in range(length)])
        assert_parity(got, ref)


def test_steady_state_branch(exported):
    """The step graph holds two variants of the step behind an If: the masked one (stream starts
    and ends) and a steady-state one without a single mask op, which OnnxStream also runs as a
    session of its own once every stream is past its lookahead. Streaming through the file's If
    alone and through OnnxStream's split gives the same logits, both equal to torch offline."""
    model, config, _, step = exported
    proto = onnx.load(str(step))
    meta = {p.key: p.value for p in proto.metadata_props}
    dilated = isinstance(model.temporal, DilatedTemporal)
    assert meta["rtsed_step_variants"] == ("steady-if-1" if dilated else "steady-if")
    (if_node,) = [n for n in proto.graph.node if n.op_type == "If"]
    branches = {a.name: a.g for a in if_node.attribute}
    steady_graphs = [branches["then_branch"]]
    if dilated:  # the steady branch is If(one frame) one-frame variant else n-frame variant
        (inner,) = [n for n in branches["then_branch"].node if n.op_type == "If"]
        steady_graphs = [a.g for a in inner.attribute]
        assert len(steady_graphs) == 2
    masked_ops = [n.op_type for n in branches["else_branch"].node]
    assert {"And", "GreaterOrEqual"} <= set(masked_ops)
    for graph in steady_graphs:
        steady_ops = [n.op_type for n in graph.node]
        assert not {"And", "GreaterOrEqual"} & set(steady_ops), steady_ops  # a mask is (t >= 0) & (t < end)
        assert len(steady_ops) < len(masked_ops)

    total = 150
    logmel = raw_logmel(config, total, seed=4)
    ref = torch_logits(model, config, logmel)[0]
    for sizes in ([1] * 70 + [total - 70], [16] * 10):
        split, whole = OnnxStream(step), OnnxStream(step)
        assert split._steady_session is not None
        whole._steady_session = None  # every step through the file's If
        outs = {}
        for name, stream in (("split", split), ("whole", whole)):
            parts, start = [], 0
            for size in sizes:
                parts.append(stream.push(logmel[0, start:start + size]))
                start += size
            parts.append(stream.flush())
            outs[name] = np.concatenate(parts)
        assert_parity(outs["split"], ref)
        assert_parity(outs["whole"], ref)
        assert_parity(outs["split"], outs["whole"])


def test_steady_session_is_pruned_to_logits_and_states(exported):
    """OnnxStream's steady session computes only logits and the new states: no Sigmoid, no
    frame-index/validity nodes, no position/end inputs. Asking for an output the graph lacks is
    an error that names it."""
    _, _, _, step = exported
    proto = onnx.load(str(step))
    stream = OnnxStream(step)
    pruned = steady_step_model(proto, stream._steady_outputs)
    full = steady_step_model(proto)
    assert [o.name for o in pruned.graph.output] == stream._steady_outputs
    # f_dil's ring rows are fed (OnnxStream._ring_indices), not computed from position.
    ring = ["dil_read", "dil_write"] if "dil_history" in stream._state_names else []
    assert [i.name for i in pruned.graph.input] == ["frames", *stream._state_names, *ring]
    assert not {"Sigmoid", "Range", "Less"} & {n.op_type for n in pruned.graph.node}
    assert {"Sigmoid", "Range", "Less"} <= {n.op_type for n in full.graph.node}
    assert len(pruned.graph.node) < len(full.graph.node)
    with pytest.raises(ExportError, match="no output.*'nope'"):
        steady_step_model(proto, ["logits", "nope"])


def test_steady_steps_report_frames_like_the_if_graph(exported):
    """A steady step leaves frame_index and valid to numpy (computed on use, from the positions
    before the step): with streams at different positions they equal what the file's If graph
    computes, step for step, and so do logits, positions and states."""
    _, config, _, step = exported
    fast, slow = OnnxStream(step, batch_size=2), OnnxStream(step, batch_size=2)
    slow._steady_session = None  # every step through the If
    rng = np.random.default_rng(7)
    steady_steps = 0
    for i, n in enumerate([9] * 6 + [16] * 3 + [1, 3, 1]):
        if i == 3:
            for s in (fast, slow):
                s.reset([0])  # stream 0 restarts: masked steps until it is past the lookahead again
        frames = raw_logmel(config, n, batch=2, seed=int(rng.integers(1 << 30)))
        a, b = fast.step(frames), slow.step(frames)
        steady_steps += a._valid is None
        np.testing.assert_array_equal(a.frame_index, b.frame_index)
        np.testing.assert_array_equal(a.valid, b.valid)
        assert_parity(a.logits, b.logits)
        np.testing.assert_array_equal(fast.positions, slow.positions)
        for name in fast.states:
            assert_parity(fast.states[name], slow.states[name])
    assert steady_steps >= 3 and fast.positions[0] != fast.positions[1]


def test_one_frame_steady_session(exported):
    """f_dil models: a steady one-frame step runs OnnxStream's third session, the steady
    branch's one-frame variant, fed the ring's K - 1 tap rows and returning only the new f_dil
    frame (no position input, no dil_history_out) and the blocks' windows, whose last K - 1
    frames become the histories (views for one stream). With two streams at different positions and
    one-frame steps among n-frame ones, logits and states equal the file's If graph's. GRU
    models have no such variant."""
    model, config, _, step = exported
    fast, slow = OnnxStream(step, batch_size=2), OnnxStream(step, batch_size=2)
    if not isinstance(model.temporal, DilatedTemporal):
        assert fast._one_frame_session is None
        with pytest.raises(ExportError, match="no one-frame"):
            steady_step_model(onnx.load(str(step)), one_frame=True)
        return
    session = fast._one_frame_session
    assert [i.name for i in session.get_inputs()] == ["frames", *fast._state_names, "dil_taps"]
    # The blocks' windows (history + new frame): the next histories are views of them.
    assert [o.name for o in session.get_outputs()] == [
        "logits", *[f"{n}_window" for n in fast._state_names if n != "dil_history"], "dil_history_new"]
    slow._steady_session = None  # every step through the If (its one-frame branch included)
    calls = []
    run = fast._run_one_frame
    fast._run_one_frame = lambda names, feeds: calls.append(feeds["dil_taps"].copy()) or run(names, feeds)
    rng = np.random.default_rng(8)
    sizes = [16] * 3 + [1] * 3 + [7] * 6 + [1] * 70 + [5, 1, 1]
    for i, n in enumerate(sizes):
        if i == 2:
            for s in (fast, slow):
                s.reset([1])  # stream 1 restarts: the streams' ring rows differ from then on
        frames = raw_logmel(config, n, batch=2, seed=int(rng.integers(1 << 30)))
        a, b = fast.step(frames), slow.step(frames)
        assert_parity(a.logits, b.logits)
        np.testing.assert_array_equal(a.frame_index, b.frame_index)
        np.testing.assert_array_equal(fast.positions, slow.positions)
        for name in fast.states:
            assert_parity(fast.states[name], slow.states[name])
    r = model.temporal.context_frames
    assert len(calls) >= 70 and fast.positions[0] % r != fast.positions[1] % r
    # Tap rows (B, 1, K - 1) are flat rows of the (B R, C) ring: stream b's within [b R, (b + 1) R).
    lo = np.arange(2)[:, None, None] * r
    assert all(t.shape == (2, 1, model.temporal.kernel - 1) for t in calls)
    assert all(((t >= lo) & (t < lo + r)).all() for t in calls)
    # One stream through push: the table of tap rows, the same logits as the If graph.
    one, ref = OnnxStream(step), OnnxStream(step)
    ref._steady_session = None
    logmel = raw_logmel(config, 200, seed=9)
    got = [one.push(logmel[0, :50])] + [one.push(logmel[0, i:i + 1]) for i in range(50, 200)]
    want = [ref.push(logmel[0, :50])] + [ref.push(logmel[0, i:i + 1]) for i in range(50, 200)]
    assert_parity(np.concatenate(got), np.concatenate(want))
    for name in one.states:
        assert_parity(one.states[name], ref.states[name])
        assert one.states[name].flags.c_contiguous
    assert one.positions[0] == 200
    # One stream through step (push's tap table and int position): the If graph's logits, frame
    # indices and positions, and each step output keeps its own frame indices after later steps.
    one, ref = OnnxStream(step), OnnxStream(step)
    ref._steady_session = None
    sizes = [one.lookahead_frames + 5] + [1] * 40 + [3, 1, 1]
    logmel = raw_logmel(config, sum(sizes), seed=10)
    bounds = np.cumsum([0, *sizes])
    outputs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        a, b = one.step(logmel[:, lo:hi]), ref.step(logmel[:, lo:hi])
        assert_parity(a.logits, b.logits)
        np.testing.assert_array_equal(one.positions, ref.positions)
        outputs.append((a, b.frame_index, b.valid))
    for a, frame_index, valid in outputs:
        np.testing.assert_array_equal(a.frame_index, frame_index)
        np.testing.assert_array_equal(a.valid, valid)
    for name in one.states:
        assert_parity(one.states[name], ref.states[name])


def test_dil_history_is_a_ring_by_position(exported):
    """dil_history (B, R, C) holds f_dil's input frame of stream position q in row q mod R (the
    state format the metadata describes, with the one-frame taps): after P frames, rolled by
    P mod R it is the CNN's offline output for the last R positions (delayed by the CNN's
    lookahead), whichever session wrote it. load_states copies (the ring is written in place)."""
    model, config, _, step = exported
    states = json.loads({p.key: p.value for p in onnx.load(str(step)).metadata_props}["rtsed_state"])
    if not isinstance(model.temporal, DilatedTemporal):
        # A GRU carries h, not a ring of past frames: its metadata says so, and nothing below applies.
        assert [s["name"] for s in states if not s["name"].startswith("block")] == ["gru_h"]
        assert not any("layout" in s or "taps" in s for s in states)
        pytest.skip(f"{type(model.temporal).__name__} keeps no dil_history ring (GRU state: gru_h only)")
    ring = next(s for s in states if s["name"] == "dil_history")
    t = model.temporal
    assert ring["layout"].startswith("ring") and ring["taps"] == list(range(0, t.context_frames, t.dilation))
    graph = StepGraph(model, config)
    total, r = 157, t.context_frames
    logmel = raw_logmel(config, total, seed=12)
    norm = config.normalization
    x = torch.from_numpy(((logmel - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)))
    with torch.no_grad():
        cnn = model.features(x)[..., 0].transpose(1, 2)[0].numpy()  # (T, C) offline CNN output
    for sizes in ([total], [1] * total, [16] * 9 + [total - 144]):
        stream, start = OnnxStream(step), 0
        for n in sizes:
            stream.push(logmel[0, start:start + n])
            start += n
        history = np.roll(stream.states["dil_history"][0], -(total % r), axis=0)  # positions total - R ...
        frames = np.arange(total - r, total) - graph.cnn_delay
        assert_parity(history, cnn[frames])
    saved = stream.states["dil_history"].copy()
    mine = saved.copy()
    stream.load_states({"dil_history": mine})
    stream.push(logmel[0, :1])
    np.testing.assert_array_equal(mine, saved)


def test_multichannel_block_histories_are_channels_last(exported):
    """The step graph keeps a block's history (B, K - 1, F, C) where the block reads C > 1
    channels (contiguous Concat/Slice per step), block 0's as (B, 1, K - 1, F)."""
    model, _, _, step = exported
    states = json.loads({p.key: p.value for p in onnx.load(str(step)).metadata_props}["rtsed_state"])
    shapes = {s["name"]: s["shape"] for s in states}
    freq = model.config.n_mels
    for i, block in enumerate(model.blocks):
        k = block.context_frames
        assert shapes[f"block{i}_history"] == (["batch", 1, k, freq] if i == 0 else ["batch", k, freq, block.in_channels])
        freq //= block.pool.kernel_size[1]


@pytest.mark.parametrize("signs", ["nonnegative", "mixed"])
def test_step_graph_either_sign_of_bn_scale(tmp_path, signs):
    """The traced CNN blocks take one of two forms: pool before the affine (every output BN
    scale a >= 0; the affine as a depthwise 1x1 Conv) or the sign trick (some a < 0). Both
    against the torch reference (RTSED_KERNELS=ref) over a whole stream."""
    model, config = randomised("dnd_7_10")
    with torch.no_grad():
        for block in model.blocks:
            block.bn.weight.abs_()
            if signs == "mixed":
                block.bn.weight[::3] *= -1
    step = export_onnx(model, config, tmp_path / "step.onnx", streaming=True)
    logmel = raw_logmel(config, 120, seed=5)
    with dispatch.forced_backend("ref"):
        ref = torch_logits(model, config, logmel)[0]
    stream = OnnxStream(step)
    parts = [stream.push(logmel[0, i:i + 16]) for i in range(0, 120, 16)]
    assert_parity(np.concatenate([*parts, stream.flush()]), ref)


def test_step_graph_below_opset_13_has_no_steady_branch(tmp_path):
    """Below opset 13 (no int64 ReduceMin / GreaterOrEqual) the step graph is the masked one alone."""
    model, config = randomised("dnd_3_1_causal")
    step = export_onnx(model, config, tmp_path / "s12.onnx", streaming=True, opset=12)
    assert not [n for n in onnx.load(str(step)).graph.node if n.op_type == "If"]
    stream = OnnxStream(step)
    assert stream._steady_session is None
    logmel = raw_logmel(config, 40, seed=6)
    got = np.concatenate([stream.push(logmel[0, :25]), stream.push(logmel[0, 25:]), stream.flush()])
    assert_parity(got, torch_logits(model, config, logmel)[0])


def test_metadata_describes_everything(exported):
    _, config, offline, step = exported
    for path, graph in ((offline, "offline"), (step, "step")):
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert meta["rtsed_graph"] == graph
        assert DetectorConfig.from_dict(json.loads(meta["rtsed_config"])) == config
    states = json.loads({p.key: p.value for p in onnx.load(str(step)).metadata_props}["rtsed_state"])
    names = [s["name"] for s in states]
    assert names[:3] == ["block0_history", "block1_history", "block2_history"]
    assert names[3] in ("gru_h", "dil_history")


def test_wrong_format_version_and_foreign_files(tmp_path):
    model, config = randomised("dnd_3_1_causal")
    path = export_onnx(model, config, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key == "rtsed_format_version":
            p.value = "99"
    onnx.save(proto, str(tmp_path / "future.onnx"))
    with pytest.raises(OnnxModelError, match=r"future.onnx.*version 99"):
        OnnxOffline(tmp_path / "future.onnx")
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(OnnxModelError, match="not an rtsed ONNX file"):
        OnnxOffline(tmp_path / "bare.onnx")
    with pytest.raises(OnnxModelError, match="streaming needs one exported with --streaming"):
        OnnxStream(path)
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(OnnxModelError, match="junk.onnx"):
        OnnxOffline(tmp_path / "junk.onnx")


def test_state_of_the_wrong_shape_is_refused(tmp_path):
    model, config = randomised("dnd_3_10")
    stream = OnnxStream(export_onnx(model, config, tmp_path / "s.onnx", streaming=True), batch_size=2)
    with pytest.raises(OnnxModelError, match=r"dil_history.*shape \(1, 20, 256\).*\(2, 20, 256\)"):
        stream.load_states({"dil_history": np.zeros((1, 20, 256), np.float32)})
    with pytest.raises(OnnxModelError, match="unknown state"):
        stream.load_states({"h": np.zeros(3)})
    with pytest.raises(OnnxModelError, match="step expects"):
        stream.step(np.zeros((1, 4, 40), np.float32))


def test_unexportable_configurations(tmp_path, monkeypatch):
    model, config = randomised("dnd_3_1")
    with pytest.raises(ExportError, match="float32"):
        export_onnx(model.double(), config, tmp_path / "d.onnx")
    model.float()
    monkeypatch.setenv("RTSED_KERNELS", "triton")
    with pytest.raises(ExportError, match="RTSED_KERNELS"):
        export_onnx(model, config, tmp_path / "t.onnx")


def test_cli_exports_and_checks(tmp_path, capsys):
    model, config = randomised("dnd_3_1_causal")
    ckpt = rtsed.save_checkpoint(tmp_path / "m.pt", model, config)
    assert export_main(["--model", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--streaming"]) == 0
    out = capsys.readouterr().out
    assert "step graph" in out and "max |diff|" in out
    (tmp_path / "broken.pt").write_bytes(b"xx")
    assert export_main(["--model", str(tmp_path / "broken.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "broken.pt" in capsys.readouterr().err


@pytest.mark.parametrize("chunks", ["ones", "varying"])
def test_io_bound_states_stream_like_offline(exported, chunks):
    """The IO-binding path (CUDA's default; forced here on the CPU provider, which binds the same
    way): states stay OrtValues between steps and the stream still equals offline."""
    model, config, _, step = exported
    total = 120
    logmel = raw_logmel(config, total, seed=4)
    ref = torch_logits(model, config, logmel)[0]
    sizes = [1] * 30 + [total - 30] if chunks == "ones" else [5, 17, 1, 40, 3, 30, 24]
    stream = OnnxStream(step, io_binding=True)
    assert stream._steady_session is None  # bound streams run the full step graph
    parts, start = [], 0
    for size in sizes:
        parts.append(stream.push(logmel[0, start:start + size]))
        start += size
        assert stream._device_states is not None  # not copied back to the host between steps
        assert all(v.device_name().lower() == "cpu" for v in stream._device_states.values())
    parts.append(stream.flush())
    assert_parity(np.concatenate(parts), ref)


def test_io_bound_batched_streams_reset_and_hold(exported):
    """Host-side changes (reset of one stream, a held stream) reach the bound device states: the
    bound stream matches the plain one step by step, states included."""
    model, config, _, step = exported
    bound, plain = OnnxStream(step, batch_size=2, io_binding=True), OnnxStream(step, batch_size=2)
    compared = 0
    for i in range(12):
        frames = raw_logmel(config, 7, batch=2, seed=20 + i)
        if i == 5:
            bound.reset([1])
            plain.reset([1])
        hold = np.array([False, i % 4 == 3])
        a, b = bound.step(frames, hold=hold), plain.step(frames, hold=hold)
        np.testing.assert_array_equal(a.valid, b.valid)
        if b.valid.any():
            assert_parity(a.logits[a.valid], b.logits[b.valid])
            compared += 1
    assert compared > 0
    for name, value in plain.states.items():
        assert_parity(bound.states[name], value)


def test_a_session_that_fell_back_to_the_cpu_is_an_error(exported, monkeypatch):
    """onnxruntime-gpu without its CUDA libraries offers CUDAExecutionProvider, then builds a CPU
    session with only a logged error. Staged with the CPU wheel, which does the same with a
    provider it lacks: the session's own providers are checked and the fallback named."""
    import onnxruntime as ort

    _, _, offline, _ = exported
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(OnnxModelError, match=r"asked for \['CUDAExecutionProvider'\].*runs on \['CPUExecutionProvider'\]"):
        OnnxOffline(offline, device="cuda")


def test_export_leaves_the_callers_model_as_it_was(tmp_path):
    """Export traces a CPU copy in eval mode: the caller's model keeps its tensors (a CUDA model
    is not moved to the CPU under its owner) and its training mode."""
    model, config = randomised("dil_3_10")
    model.train()
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    export_onnx(model, config, tmp_path / "m.onnx")
    assert model.training
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == before
