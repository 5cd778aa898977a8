"""A new temporal family, defined here and nowhere else, streams, exports and serves: the torch
stream, the ONNX step graph with onnxruntime, and both engines take any part that implements the
``TemporalPart`` protocol (rtsed.models.layers), with no edits elsewhere. Registered by name
(rtsed.models.families.register_temporal), its configs validate and its checkpoints rebuild it.

The family: a depthwise causal FIR filter over time (K taps per CNN channel, ReLU), optionally
looking ahead ``right_pad`` frames. Its state is its last K - 1 input frames.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtsed.config import ConfigError, DecoderConfig, DetectorConfig, FrontendConfig, ModelConfig, NormalizationStats
from rtsed.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rtsed.models.families import register_temporal
from rtsed.models.layers import TemporalPart
from rtsed.models.model import SEDModel
from rtsed.serve.decode import SoundEvent, decode_offline
from rtsed.serve.detector import Detector
from rtsed.serve.engine import DetectionEngine, MultiStreamEngine
from rtsed.serve.steppers import OnnxStepper, TorchStepper
from rtsed.stream.model_stream import ModelStream, stream_logits
from rtsed.stream.onnx_export import export_onnx
from rtsed.stream.onnx_runtime import OnnxStream

ATOL, RTOL = 1e-5, 1e-4  # the parity rule of docs/streaming.md (fp32)
LABELS = ("tone", "noise", "click")


class FIRState:
    """The last K - 1 input frames, (B, K - 1, C); zeros are the offline left padding."""

    def __init__(self, frames: Tensor):
        self.frames = frames

    def reset(self, streams: Tensor | None = None) -> None:
        if streams is None:
            self.frames.zero_()
        else:
            self.frames[streams] = 0


class CausalFIR(TemporalPart):
    def __init__(self, channels: int, taps: int, right_pad: int):
        super().__init__()
        self.channels, self.taps, self.right_pad = channels, taps, right_pad
        self.weight = nn.Parameter(torch.randn(channels, 1, taps) * 0.5)
        self.bias = nn.Parameter(torch.randn(channels) * 0.1)

    @property
    def out_features(self) -> int:
        return self.channels

    def _filter(self, window: Tensor) -> Tensor:
        """(B, T + K - 1, C) -> (B, T, C)."""
        y = F.conv1d(window.transpose(1, 2), self.weight, self.bias, groups=self.channels)
        return torch.relu(y).transpose(1, 2)

    def forward(self, h: Tensor) -> Tensor:
        x = F.pad(h[..., 0].transpose(1, 2), (0, 0, self.taps - 1 - self.right_pad, self.right_pad))
        return self._filter(x)

    def init_state(self, batch_size, max_step_frames, device, dtype) -> FIRState:
        return FIRState(torch.zeros(batch_size, self.taps - 1, self.channels, device=device, dtype=dtype))

    def step(self, h: Tensor, state: FIRState, skip: Tensor | None = None) -> Tensor:
        out, (frames,) = self.export_step(h[..., 0].transpose(1, 2), [state.frames], skip)
        state.frames.copy_(frames)
        return out

    def state_specs(self):
        return [("fir_history", ("batch", self.taps - 1, self.channels))]

    def export_step(self, x: Tensor, states: list[Tensor], skip: Tensor | None):
        window = torch.cat([states[0], x], dim=1)
        return self._filter(window), [window[:, window.shape[1] - (self.taps - 1):]]


register_temporal("causal_fir", lambda config: CausalFIR(config.channels, **config.temporal_params),
                  replace=True)


def fir_model(padding: str, right_pad: int, seed: int = 0) -> tuple[SEDModel, DetectorConfig]:
    torch.manual_seed(seed)
    name = "dws" if padding == "same" else "dws_causal"
    config = DetectorConfig(
        frontend=FrontendConfig.for_rate(16000),
        model=ModelConfig.from_name(name, n_classes=3, channels=16, temporal="causal_fir",
                                    temporal_params={"taps": 5, "right_pad": right_pad}),
        labels=LABELS,
        normalization=NormalizationStats(mean=(-6.0,) * 40, std=(3.0,) * 40),
        decoder=DecoderConfig(on_thresholds=(0.6, 0.55, 0.5), off_thresholds=(0.4, 0.45, 0.5), min_event_s=0.06),
    )
    model = SEDModel(config.model, temporal=CausalFIR(16, taps=5, right_pad=right_pad))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        model.classifier.weight.mul_(10.0)
    return model.eval(), config


CASES = [("same", 2), ("same", 0), ("causal", 0), ("causal", 3)]


@pytest.mark.parametrize("padding,right_pad", CASES)
def test_streams_equal_offline(padding, right_pad):
    model, _ = fir_model(padding, right_pad)
    assert model.lookahead_frames == (6 if padding == "same" else 0) + right_pad
    frames = torch.randn(97, 40)
    with torch.no_grad():
        offline = model(frames[None])[0]
    for chunks in ([97], [1] * 97, [5, 13, 2, 40, 37]):
        torch.testing.assert_close(stream_logits(model, frames, chunks), offline, atol=ATOL, rtol=RTOL)
    # Batched streams with their own starts and ends.
    stream = ModelStream(model, batch_size=2)
    rows = {0: [], 1: []}
    x = torch.stack([frames, frames.flip(0)])
    with torch.no_grad():
        steps = [x[:, start:start + 8] for start in range(0, 97, 8)]
        for i, step in enumerate(steps + [torch.zeros(2, model.lookahead_frames + 3, 40)]):
            if i == len(steps):
                stream.end()  # the rest is offline padding
            out = stream.step(step)
            for b in (0, 1):
                rows[b].append(out.logits[b][out.valid[b]])
        other = model(x[1:])[0]
    torch.testing.assert_close(torch.cat(rows[0]), offline, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.cat(rows[1]), other, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("padding,right_pad", CASES)
def test_a_checkpoint_names_and_rebuilds_the_family(tmp_path, padding, right_pad):
    """Saved, the family is named in the checkpoint's config; loaded back by that name, the
    rebuilt model computes what the saved one did and streams equal to its offline output."""
    model, config = fir_model(padding, right_pad)
    path = save_checkpoint(tmp_path / "fir.pt", model, config, {"note": "fir"})
    loaded = load_checkpoint(path)
    assert loaded.config.model.temporal == "causal_fir"
    assert loaded.config.model.temporal_params == {"taps": 5, "right_pad": right_pad}
    assert isinstance(loaded.model.temporal, CausalFIR) and loaded.model.temporal.right_pad == right_pad
    assert loaded.model.lookahead_frames == model.lookahead_frames
    frames = torch.randn(83, 40)
    with torch.no_grad():
        offline = loaded.model(frames[None])[0]
        torch.testing.assert_close(offline, model(frames[None])[0], atol=0, rtol=0)
    for chunks in ([83], [1] * 83, [7, 30, 1, 45]):
        torch.testing.assert_close(stream_logits(loaded.model, frames, chunks), offline, atol=ATOL, rtol=RTOL)


def test_an_unregistered_family_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="registered ones are .*'gru', 'dilated'.*'causal_fir'"):
        ModelConfig.from_name("dws", temporal="no_such_family")
    model, config = fir_model("same", 2)
    path = save_checkpoint(tmp_path / "fir.pt", model, config)
    payload = torch.load(path, weights_only=True)
    payload["config"]["model"]["temporal"] = "no_such_family"
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no_such_family.*causal_fir"):
        load_checkpoint(tmp_path / "other.pt")


def test_the_papers_families_keep_their_config_dicts():
    """gru and dilated are registered like any family, and their configs read and write as before
    (no temporal_params key: checkpoints and ONNX files stay readable by earlier releases)."""
    for name in ("dnd_7_10", "base_causal"):
        config = ModelConfig.from_name(name)
        assert "temporal_params" not in config.to_dict()
        assert ModelConfig.from_dict(config.to_dict()) == config
        assert hash(config) == hash(ModelConfig.from_name(name))
    with pytest.raises(ConfigError, match="cannot be replaced"):
        register_temporal("gru", lambda config: None, replace=True)


@pytest.mark.parametrize("padding,right_pad", CASES[:3])
def test_exports_and_runs_in_onnxruntime(tmp_path, padding, right_pad):
    pytest.importorskip("onnxruntime")
    model, config = fir_model(padding, right_pad)
    path = export_onnx(model, config, tmp_path / "fir.onnx", streaming=True)
    frames = torch.randn(61, 40)
    logmel = frames * 3.0 - 6.0  # the graph normalises inside
    with torch.no_grad():
        offline = model(frames[None])[0].numpy()
    for chunk in (1, 7, 61):
        stream = OnnxStream(path)
        parts = [stream.push(logmel[i:i + chunk].numpy()) for i in range(0, 61, chunk)]
        parts.append(stream.flush())
        np.testing.assert_allclose(np.concatenate(parts), offline, atol=ATOL, rtol=RTOL)
    batched = OnnxStream(path, batch_size=2)
    batched.reset([1])
    assert batched.states["fir_history"].shape == (2, 4, 16)


def _scene(seconds=4.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.01 * rng.standard_normal(t.shape)
    x += 0.3 * np.sin(2 * np.pi * 800 * t) * ((t > 1.0) & (t < 2.0))
    x += 0.2 * rng.standard_normal(t.shape) * ((t > 2.5) & (t < 3.2))
    return x.astype(np.float32)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_serves_through_both_engines(tmp_path, backend):
    model, config = fir_model("same", 2)
    audio = _scene()

    with torch.no_grad():  # centre each class's logits on the scene, so that events start and end
        model.classifier.bias -= Detector(config, model).detect_logits(audio).median(0).values
        probs = torch.sigmoid(Detector(config, model).detect_logits(audio)).numpy()
    expected = decode_offline(probs, config.labels, config.frontend.hop_s, config.decoder)
    assert expected, "the fixture model should produce some events"

    def stepper(batch_size):
        if backend == "torch":
            return TorchStepper(model, config, batch_size)
        pytest.importorskip("onnxruntime")
        path = tmp_path / "fir_step.onnx"
        if not path.exists():
            export_onnx(model, config, path, streaming=True)
        return OnnxStepper(path, batch_size)

    engine = DetectionEngine(stepper(1), config, frames_per_step=3)
    items = []
    for i in range(0, len(audio), 1000):
        items += engine.push_audio(audio[i:i + 1000])
    items += engine.flush()
    got = [e for e in items if isinstance(e, SoundEvent)]
    key = lambda e: (e.onset_s, e.label)  # noqa: E731
    assert [(e.label, e.onset_s, e.offset_s) for e in sorted(got, key=key)] == \
        [(e.label, e.onset_s, e.offset_s) for e in sorted(expected, key=key)]
    for a, b in zip(sorted(got, key=key), sorted(expected, key=key)):
        assert a.score == pytest.approx(b.score, abs=1e-4)

    many = MultiStreamEngine(stepper(2), config, frames_per_step=4)
    many.start(0)
    many.start(1)
    events = {0: [], 1: []}
    for i in range(0, len(audio), 1600):
        for slot in (0, 1):
            many.push_audio(slot, audio[i:i + 1600])
        while many.ready():
            for slot, out in many.step().items():
                events[slot] += [e for e in out if isinstance(e, SoundEvent)]
    for slot in (0, 1):
        events[slot] += many.stop(slot)
    assert events[0] == events[1] and events[0]
