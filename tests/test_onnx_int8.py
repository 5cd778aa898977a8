"""int8 ONNX graphs (rtsed.export --quantize int8): calibrated on real (here procedural) audio,
carried state kept fp32, a ten-minute stream that stays with its offline twin, the graph serving
rtsed.detect, rtsed.live and the engines, and the no-VNNI note."""

import json
import logging

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch

from engine_helpers import lively_checkpoint
from rtsed.audio.frontend import LogMel
from rtsed.backends.precision import cpu_int8_dot, int8_note
from rtsed.cli.detect import main as detect_main
from rtsed.cli.export import main as export_main
from rtsed.models.checkpoint import load_checkpoint
from rtsed.serve.engine import DetectionEngine, MultiStreamEngine, make_stepper
from rtsed.stream import onnx_runtime
from rtsed.stream.onnx_export import SHARED_MIN_BYTES, steady_step_model
from rtsed.stream.onnx_quantize import export_int8, files_digest
from rtsed.stream.onnx_runtime import OnnxFile, OnnxOffline, OnnxStream

RATE = 16000
# Streaming int8 against the offline int8 graph, on logits: the two graphs are quantized and
# calibrated separately (their activation ranges differ by the frames each saw), so they agree to
# the int8 grid, not to fp32 parity. Measured here: max 0.047, mean 0.008 over ten minutes of
# logits reaching +-3.5.
STREAM_VS_OFFLINE_ATOL = 0.1


def scene(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Quiet noise with tones of random pitch, length and level: a signal with events in it."""
    n = int(seconds * RATE)
    x = rng.standard_normal(n).astype(np.float32) * 0.02
    t = np.arange(n) / RATE
    for _ in range(int(seconds / 2)):
        start, length = rng.integers(0, n - RATE), rng.integers(RATE // 5, RATE)
        x[start:start + length] += 0.3 * rng.uniform(0.1, 1) * np.sin(2 * np.pi * rng.uniform(200, 4000) * t[:length])
    return x


@pytest.fixture(scope="module")
def int8_graphs(tmp_path_factory):
    """A small dnd_7_10 checkpoint, a calibration folder, and its int8 step and offline graphs."""
    tmp = tmp_path_factory.mktemp("int8")
    calibration = tmp / "calibration"
    calibration.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        sf.write(calibration / f"train_{i}.wav", scene(rng, 10.0), RATE)
    ckpt_path = lively_checkpoint(tmp / "m.pt", "dnd_7_10", ("a", "b", "c"), seed=1)
    ckpt = load_checkpoint(ckpt_path)
    step = export_int8(ckpt.model, ckpt.config, tmp / "step_int8.onnx", calibration, streaming=True, max_steps=10**6)
    offline = export_int8(ckpt.model, ckpt.config, tmp / "offline_int8.onnx", calibration)
    return {"ckpt_path": ckpt_path, "ckpt": ckpt, "calibration": calibration, "step": step, "offline": offline,
            "tmp": tmp}


def test_int8_stream_stays_with_offline_int8_for_ten_minutes(int8_graphs):
    """30,000 frames: first in chunks of 1..9 frames (masked, one-frame and n-frame variants), then
    16 per step; logits within STREAM_VS_OFFLINE_ATOL of the offline int8 graph's everywhere, and
    the last minute no further off than the first (nothing builds up through the state)."""
    ckpt = int8_graphs["ckpt"]
    with torch.no_grad():
        logmel = LogMel(ckpt.config.frontend)(torch.from_numpy(scene(np.random.default_rng(5), 600.0))).numpy()
    reference = OnnxOffline(int8_graphs["offline"]).logits(logmel[None])[0]
    stream, parts, start, rng = OnnxStream(int8_graphs["step"]), [], 0, np.random.default_rng(1)
    while start < len(logmel):
        size = int(rng.integers(1, 10)) if start < 3000 else 16
        parts.append(stream.push(logmel[start:start + size]))
        start += size
    got = np.concatenate([*parts, stream.flush()])
    assert got.shape == reference.shape
    off = np.abs(got - reference)
    assert off.max() <= STREAM_VS_OFFLINE_ATOL, f"max |int8 stream - int8 offline| = {off.max():.4f}"
    minute = 3000
    assert off[-minute:].max() <= 1.5 * off[:minute].max() + 1e-3, "the error grows along the stream"
    # And int8 is close to the fp32 model (it is quantized, not broken): probabilities.
    norm = ckpt.config.normalization
    with torch.no_grad():
        x = (torch.from_numpy(logmel) - torch.tensor(norm.mean)) / torch.tensor(norm.std)
        fp32 = torch.sigmoid(ckpt.model.eval()(x[None])[0]).numpy()
    deviation = np.abs(1 / (1 + np.exp(-got)) - fp32)
    assert deviation.max() < 0.05 and deviation.mean() < 0.005, (deviation.max(), deviation.mean())


def test_int8_graph_is_quantized_keeps_state_fp32_and_records_its_calibration(int8_graphs):
    proto = onnx.load(str(int8_graphs["step"]))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["rtsed_precision"] == "int8"
    record = json.loads(meta["rtsed_calibration"])
    folder = int8_graphs["calibration"]
    assert record["files"] == ["train_0.wav", "train_1.wav", "train_2.wav"]
    assert record["sha256"] == files_digest(folder, sorted(folder.glob("*.wav")))
    assert record["frames"] == 3 * 499 and record["steps"] > 0
    for one_frame in (False, True):
        branch = steady_step_model(proto, one_frame=one_frame).graph
        producer = {o: n for n in branch.node for o in n.output}
        convs = [n for n in branch.node if n.op_type == "Conv"]
        inits = {i.name: i for i in branch.initializer}
        (classifier,) = [n for n in branch.node if n.op_type == "MatMul"]  # the channels-last head
        reads = [producer[x] for c in [*convs, classifier] for x in c.input[:2] if x in producer]
        # Every conv and the classifier read int8 activations and int8 weights through DequantizeLinear.
        assert len(reads) == 2 * (len(convs) + 1) and all(n.op_type == "DequantizeLinear" for n in reads)
        weights = [producer[c.input[1]].input[0] for c in [*convs, classifier]]
        assert all(inits[w].data_type == onnx.TensorProto.INT8 for w in weights)
        for out in branch.output:
            if out.name.endswith("_history_out"):
                node = producer[out.name]
                assert node.op_type not in ("QuantizeLinear", "DequantizeLinear"), out.name
                # ... nor does the node that makes it read a dequantized value (no rounding on the way round).
                assert all(producer[x].op_type != "DequantizeLinear" for x in node.input if x in producer), out.name
        # A block's window (history + new frames) is an fp32 Concat; the Transpose that takes it
        # to its conv moves int8 values (quantize_windows_before_transpose): Concat -> Q -> DQ ->
        # Transpose, never Concat -> Transpose, in both multi-channel blocks.
        transposes = [n for n in branch.node if n.op_type == "Transpose" and n.input[0] in producer]
        assert not [t.name for t in transposes if producer[t.input[0]].op_type == "Concat"]
        moved = [t for t in transposes if producer[t.input[0]].op_type == "DequantizeLinear"
                 and producer[producer[t.input[0]].input[0]].op_type == "QuantizeLinear"
                 and producer.get(producer[producer[t.input[0]].input[0]].input[0]) is not None
                 and producer[producer[producer[t.input[0]].input[0]].input[0]].op_type == "Concat"]
        assert len(moved) == 2, [t.name for t in moved]
        # The logits come out of fp32 arithmetic (the classifier's output is not quantized).
        assert all(n.input[0] != classifier.output[0] for n in branch.node if n.op_type == "QuantizeLinear")
        assert producer["logits"].op_type not in ("DequantizeLinear",)
    # Each weight is stored once, though three step variants (masked, steady, one-frame) read it.
    stored, graphs = [], [proto.graph]
    while graphs:
        g = graphs.pop()
        stored += [i.raw_data for i in g.initializer if len(i.raw_data) >= SHARED_MIN_BYTES]
        graphs += [a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    assert len(stored) == len(set(stored)) and len(stored) >= 8
    assert sum(i.name.startswith("shared/") for i in proto.graph.initializer) >= 8
    # The file still opens as an rtsed graph whose content hash checks.
    assert OnnxFile.open(int8_graphs["step"]).precision == "int8"


def test_int8_graph_serves_detect_live_and_the_engines(int8_graphs, tmp_path, capsys):
    step = int8_graphs["step"]
    audio = scene(np.random.default_rng(9), 8.0)
    wav = tmp_path / "scene.wav"
    sf.write(wav, audio, RATE)
    assert detect_main([str(wav), "--model", str(step), "--backend", "onnx", "--output", str(tmp_path / "e.tsv")]) == 0
    detected = (tmp_path / "e.tsv").read_text().splitlines()[1:]
    stepper, config, _ = make_stepper(step, "onnx")
    engine = DetectionEngine(stepper, config)
    events = [item for item in [*engine.push_audio(audio), *engine.flush()] if hasattr(item, "offset_s")]
    assert len(detected) == len(events) > 0
    # Two streams in one batched engine, one of them this scene: the same probabilities as alone.
    multi_stepper, _, _ = make_stepper(step, "onnx", batch_size=2)
    alone = OnnxStream(step)
    frames = LogMel(config.frontend)(torch.from_numpy(audio)).numpy()
    other = np.random.default_rng(2).standard_normal(frames.shape).astype(np.float32) - 6
    multi = multi_stepper.stream
    a = np.concatenate([multi.step(np.stack([frames[i:i + 16], other[i:i + 16]])).logits[0]
                        for i in range(0, len(frames) - 16, 16)])
    b = np.concatenate([alone.step(frames[None, i:i + 16]).logits[0] for i in range(0, len(frames) - 16, 16)])
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert MultiStreamEngine(multi_stepper, config).n == 2
    from rtsed.cli.live import main as live_main

    assert live_main(["--model", str(step), "--backend", "onnx", "--input", str(wav), "--no-view", "--jsonl",
                      str(tmp_path / "e.jsonl")]) == 0
    assert "int8 graph" in capsys.readouterr().err
    lines = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert len([x for x in lines if x["type"] == "event"]) == len(events)


def test_export_cli_int8_errors_name_the_fix(int8_graphs, tmp_path, capsys):
    ckpt = str(int8_graphs["ckpt_path"])
    with pytest.raises(SystemExit):
        export_main(["--model", ckpt, "--out", str(tmp_path / "q.onnx"), "--streaming", "--quantize", "int8"])
    assert "needs --calibration DIR" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert export_main(["--model", ckpt, "--out", str(tmp_path / "q.onnx"), "--streaming", "--quantize", "int8",
                        "--calibration", str(tmp_path / "empty")]) == 2
    assert "no audio files" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()


def test_no_vnni_is_said_once_and_doctor_names_the_precision(int8_graphs, monkeypatch, caplog):
    assert cpu_int8_dot({"avx2", "avx512_vnni"}) == "avx512_vnni"
    assert cpu_int8_dot({"avx2", "avx_vnni"}) == "avx_vnni"
    assert cpu_int8_dot({"avx2", "fma"}) is None
    assert "no VNNI" in int8_note({"avx2"}) and "avx512_vnni" in int8_note({"avx512_vnni"})
    monkeypatch.setattr("rtsed.backends.precision.cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(onnx_runtime, "_WARNED_NO_VNNI", set())
    with caplog.at_level(logging.WARNING, logger="rtsed.stream.onnx_runtime"):
        OnnxStream(int8_graphs["step"])
        OnnxStream(int8_graphs["step"])
    notes = [r for r in caplog.records if "no VNNI" in r.getMessage()]
    assert len(notes) == 1 and "int8 graph" in notes[0].getMessage()
    from rtsed.cli.doctor import environment

    assert dict(environment())["int8"].startswith("no VNNI")


def tiny_conv_model(rng: np.random.Generator):
    """x (1, 1, 6, 6) -> conv, relu, 1x1 conv -> logits: the smallest graph the quantizer treats
    as ours (a classifier that stays fp32 after a quantized conv)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w2"], ["logits"], name="classifier")],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def input_scale(proto) -> float:
    from onnx import numpy_helper

    (q,) = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x"]
    return float({i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}[q.input[1]])


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_calibration_takes_the_range_of_every_feed(method):
    """The activation ranges cover every calibration feed: a loud first step among 129 quiet
    ones sets the input's scale (onnxruntime's calibrator, given CalibMaxIntermediateOutputs,
    kept only the last len(feeds) mod N feeds' ranges, and failed on a multiple of N). A whole
    loud step is 0.8% of the values: inside the default percentile's range too."""
    from rtsed.stream.onnx_quantize import quantize_proto

    rng = np.random.default_rng(0)
    proto = tiny_conv_model(rng)
    feeds = [{"x": rng.uniform(-1, 1, (1, 1, 6, 6)).astype(np.float32) * (100.0 if i == 0 else 1.0)}
             for i in range(129)]
    for count in (129, 128):
        scale = input_scale(quantize_proto(proto, feeds[:count], method=method))
        assert scale * 255 >= 150, (count, scale)  # the loud feed's range (about -100..100)


def test_percentile_ranges_leave_out_a_rare_outlier():
    """One outlying value among 7,200 sets MinMax's input range (a grid 50x coarser for every
    other value); percentile calibration at 99.9 keeps the bulk's range. An unknown method is
    refused by name."""
    from rtsed.stream.onnx_quantize import QuantizeError, quantize_proto

    rng = np.random.default_rng(1)
    proto = tiny_conv_model(rng)
    feeds = [{"x": rng.uniform(-1, 1, (1, 1, 6, 6)).astype(np.float32)} for _ in range(200)]
    feeds[50]["x"][0, 0, 2, 3] = 100.0
    assert input_scale(quantize_proto(proto, feeds, method="minmax")) * 255 >= 100
    assert input_scale(quantize_proto(proto, feeds, method="percentile", percentile=99.9)) * 255 <= 2.5
    with pytest.raises(QuantizeError, match="use one of percentile, minmax"):
        quantize_proto(proto, feeds, method="entropy")


def test_logit_bias_correction_removes_a_shift_near_the_threshold():
    """A per-class shift of the logits (what int8 rounding left near the threshold) is measured
    on the calibration feeds against the fp32 graph and taken off the logits' own bias: the
    corrected graph's logits are the fp32 graph's; cells far from the threshold do not count."""
    from onnx import TensorProto, helper, numpy_helper

    from rtsed.stream.onnx_quantize import correct_logit_bias, graph_logits

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((8, 3)).astype(np.float32) * 0.3

    def head(bias, far_shift=0.0):
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"])]
        if far_shift:  # moves only the cells whose product lies beyond 2: outside the band
            nodes += [helper.make_node("Sub", ["m", "two"], ["over"]), helper.make_node("Relu", ["over"], ["r"]),
                      helper.make_node("Sign", ["r"], ["s"]), helper.make_node("Mul", ["s", "far"], ["shift"]),
                      helper.make_node("Add", ["m", "shift"], ["moved"])]
        nodes.append(helper.make_node("Add", ["moved" if far_shift else "m", "b"], ["logits"]))
        graph = helper.make_graph(
            nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, 8])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.asarray(bias, np.float32), "b"),
             numpy_helper.from_array(np.float32(2.0), "two"), numpy_helper.from_array(np.float32(far_shift), "far")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    fp32 = head([0.1, -0.2, 0.0])
    shifted = head([0.1 + 0.3, -0.2, 0.0 - 0.15], far_shift=5.0)
    feeds = [{"x": rng.standard_normal((1, 16, 8)).astype(np.float32) * 2} for _ in range(40)]
    correction = correct_logit_bias(fp32, shifted, feeds)
    np.testing.assert_allclose(correction, [0.3, 0.0, -0.15], atol=1e-5)
    reference, corrected = graph_logits(fp32, feeds, False), graph_logits(shifted, feeds, False)
    near = np.abs(reference) < 1.0
    np.testing.assert_allclose(corrected[near], reference[near], atol=1e-5)


def test_conv_bias_correction_takes_the_mean_error_off_each_conv_in_turn():
    """Two convs whose int8 weights are rounded up (a mean error per channel on inputs that do not
    average zero, as after a ReLU): each conv's bias is corrected by its mean int8 - fp32 output
    per channel on the calibration feeds, the second one after the first (so its correction
    takes only what is left), and the corrected graph's conv outputs average fp32's per channel."""
    from onnx import TensorProto, helper, numpy_helper

    from rtsed.stream.onnx_quantize import _channel_means, correct_conv_biases

    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((3, 4, 1, 1)).astype(np.float32)
    b1, b2 = rng.standard_normal(4).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    scale1, scale2 = np.float32(0.05), np.float32(0.04)

    def graph(quantized: bool):
        weights, nodes = [], []
        for name, w, scale in (("w1", w1, scale1), ("w2", w2, scale2)):
            if quantized:  # int8 weights rounded up: every product comes out a little high
                q = np.clip(np.ceil(w / scale), -127, 127).astype(np.int8)
                weights += [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_s")]
                nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s"], [name]))
            else:
                weights.append(numpy_helper.from_array(w, name))
        if quantized:  # conv2's bias as the quantizer writes it: int32 steps of a scale
            weights += [numpy_helper.from_array(np.round(b2 / 1e-4).astype(np.int32), "b2_q"),
                        numpy_helper.from_array(np.float32(1e-4), "b2_s")]
            nodes.append(helper.make_node("DequantizeLinear", ["b2_q", "b2_s"], ["b2"]))
        nodes += [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1], name="conv1"),
                  helper.make_node("Relu", ["h"], ["r"], name="relu"),
                  helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2"),
                  helper.make_node("Identity", ["y"], ["logits"], name="out")]
        g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              [*weights, numpy_helper.from_array(b1, "b1"),
                               *([] if quantized else [numpy_helper.from_array(b2, "b2")])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    fp32, int8 = graph(False), graph(True)
    feeds = [{"x": rng.uniform(0, 2, (1, 2, 6, 6)).astype(np.float32)} for _ in range(30)]
    before = [a - b for a, b in zip(_channel_means(int8, feeds, False, ["h", "y"]),
                                    _channel_means(fp32, feeds, False, ["h", "y"]))]
    assert np.all(before[0] > 0.05), before[0]  # the rounding left a real, one-signed error
    corrections = correct_conv_biases(fp32, int8, feeds)
    assert list(corrections) == ["conv1", "conv2"]
    np.testing.assert_allclose(corrections["conv1"], before[0], rtol=1e-4, atol=1e-5)
    # conv2's own error, after conv1's is gone, is not what it was with conv1's still in.
    assert np.abs(corrections["conv2"] - before[1]).max() > 1e-3
    after = [a - b for a, b in zip(_channel_means(int8, feeds, False, ["h", "y"]),
                                   _channel_means(fp32, feeds, False, ["h", "y"]))]
    np.testing.assert_allclose(after[0], 0, atol=1e-5)
    np.testing.assert_allclose(after[1], 0, atol=1e-4)  # half a step of its int32 bias, at most
    # And on onnxruntime's own QDQ graph (conv1 quantized, its bias int32; conv2 the fp32 classifier).
    from rtsed.stream.onnx_quantize import quantize_proto

    quantized = quantize_proto(fp32, feeds, method="minmax")
    (conv1,) = [n for n in quantized.graph.node if n.name == "conv1"]
    error = _channel_means(quantized, feeds, False, [conv1.output[0]])[0] - _channel_means(fp32, feeds, False, ["h"])[0]
    np.testing.assert_allclose(error, 0, atol=1e-4)
