"""--precision bf16 at inference (rtsed.backends.precision): the GEMMs in bf16 under CPU autocast, the rest
float32. Checked against fp32 at bf16's accuracy (not the fp32 parity rule: bf16 keeps 8 bits of
mantissa) on the bundled detectors, with bounds that an error in the bf16 path would cross (negative
controls below), for the offline model, the streaming step and the tools' stepper; and that bf16 is
refused where it has not been built or measured (onnxruntime, CUDA) with a message naming the fix.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

import rtsed.backends.cpu as cpu
from rtsed.backends import precision
from rtsed.models.bundled import BUNDLED_DIR
from rtsed.models.checkpoint import load_checkpoint
from rtsed.serve.detector import Detector
from rtsed.serve.engine import make_stepper
from rtsed.models.model import build_model
from rtsed.stream.model_stream import ModelStream

# tests/ is not a package: pytest puts this folder on sys.path, so the engine tests' fixture is shared.


def _model(seed=0):
    torch.manual_seed(seed)
    model = build_model("dnd_7_10", n_classes=6)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def bf16_calls(monkeypatch):
    """Counts the GEMMs that ran with bf16 operands."""
    calls = []
    real = cpu._bf16_operands
    monkeypatch.setattr(cpu, "_bf16_operands", lambda w, b: calls.append(tuple(w.shape)) or real(w, b))
    return calls


def test_fused_linear_in_bf16_under_autocast(bf16_calls):
    x, w, b = torch.randn(640, 256), torch.randn(256, 256) / 16, torch.randn(256)
    exact = torch.relu(x.double() @ w.double().t() + b.double())
    fp32 = cpu.fused_linear(x, w, b, "relu")
    with precision.autocast("bf16"):
        bf16 = cpu.fused_linear(x, w, b, "relu")
    assert bf16.dtype == torch.float32 and bf16_calls == [(256, 256)]
    if cpu._MKLDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear: fp32 runs either way")
    bf16_error = (bf16.double() - exact).abs().max().item()
    assert (fp32.double() - exact).abs().max().item() < 1e-4 < bf16_error < 5e-2  # bf16's rounding, no worse


def test_bf16_weights_are_converted_once_and_refreshed_after_a_change():
    w, b = torch.randn(64, 32), torch.randn(64)
    first = cpu._bf16_operands(w, b)
    assert cpu._bf16_operands(w, b)[0] is first[0]
    with torch.no_grad():
        w.mul_(2)  # an optimizer step or a checkpoint load changes the weight in place
    refreshed = cpu._bf16_operands(w, b)
    assert refreshed[0] is not first[0]
    torch.testing.assert_close(refreshed[0].float(), (w).to(torch.bfloat16).float())


# bf16 against fp32 on the bundled detectors, in probabilities: the largest and the mean absolute gap
# over every frame and class. Measured on the 12 s procedural scene below: max 0.007, mean 4-5e-4 (both
# detectors); on ten fold-4 ESC-10 clips max 0.0074, mean 4.6e-4. A real error crosses both bounds:
# every weight matrix scaled by 1 + 2**-8 (one bf16 ulp, as a rounding bug in each layer would) moves
# probabilities by max 0.036-0.041, mean 3.5-4.3e-3; zeroing three of the 64 mel bands by max
# 0.54-0.67, mean 3.2-3.6e-2 (both asserted below as negative controls).
BF16_MAX_GAP = 0.02
BF16_MEAN_GAP = 1.5e-3


def _gaps(probs: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max, mean) absolute difference of two (T, C) probability arrays."""
    diff = (probs - reference).abs()
    return diff.max().item(), diff.mean().item()


def _within_bf16_accuracy(probs: torch.Tensor, reference: torch.Tensor) -> bool:
    worst, mean = _gaps(probs, reference)
    return worst <= BF16_MAX_GAP and mean <= BF16_MEAN_GAP


def _bundled(name: str):
    """(detector model, normalised (1, T, F) features of a procedural 12 s scene) for a bundled detector."""
    from procedural import sound_scene

    ckpt = load_checkpoint(BUNDLED_DIR / f"{name}.pt")
    detector = Detector(ckpt.config, ckpt.model).eval()
    samples = torch.from_numpy(sound_scene(ckpt.config.frontend.sample_rate_hz, 12.0, seed=0))
    with torch.no_grad():
        return detector.model, detector.features(samples[None])


@pytest.mark.parametrize("name", ["dnd_7_10", "dnd_7_10_causal"])
def test_bf16_matches_fp32_on_the_bundled_detector_and_a_real_error_would_not(name, bf16_calls):
    model, feats = _bundled(name)
    with torch.no_grad():
        fp32 = torch.sigmoid(model(feats))[0]
        with precision.autocast("bf16"):
            bf16 = torch.sigmoid(model(feats))[0]
    assert bf16_calls, "the offline forward ran its GEMMs in bf16"
    assert bf16.dtype == torch.float32
    # The scene drives the detector across its range, so a gap is measured where decisions are made.
    assert 0.01 < (fp32 > 0.5).float().mean().item() < 0.5 and fp32.max() > 0.9
    worst, mean = _gaps(bf16, fp32)
    print(f"{name}: bf16 - fp32 probabilities: max {worst:.4f}, mean {mean:.2e}, decisions flipped at 0.5: "
          f"{((bf16 > 0.5) != (fp32 > 0.5)).float().mean().item():.3%}")
    assert 0 < worst and _within_bf16_accuracy(bf16, fp32), (worst, mean)

    # Negative controls: errors a broken bf16 path could make exceed the same bounds.
    with torch.no_grad():
        bands_zeroed = feats.clone()
        bands_zeroed[..., 10:13] = 0
        assert not _within_bf16_accuracy(torch.sigmoid(model(bands_zeroed))[0], fp32), "3 mel bands zeroed"
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            for p in model.parameters():
                if p.dim() > 1:
                    p.mul_(1 + 2 ** -8)
            off_by_an_ulp = torch.sigmoid(model(feats))[0]
        finally:
            model.load_state_dict(saved)
        assert not _within_bf16_accuracy(off_by_an_ulp, fp32), "every weight one bf16 ulp off"
        torch.testing.assert_close(torch.sigmoid(model(feats))[0], fp32, rtol=0, atol=0)  # restored

    with torch.inference_mode(), precision.autocast("bf16"):  # folds made there keep no version counter
        torch.testing.assert_close(torch.sigmoid(model(feats))[0], bf16, rtol=0, atol=1e-6)


def test_streaming_bf16_matches_fp32_on_the_bundled_detector(bf16_calls):
    model, feats = _bundled("dnd_7_10")
    feats = feats[:, :300]
    with torch.no_grad():
        fp32 = torch.sigmoid(model(feats))[0]
        with precision.autocast("bf16"):
            bf16 = torch.sigmoid(model(feats))[0]
    stream = ModelStream(model, precision="bf16")
    chunks = [stream.push(feats[0, i:i + 16]) for i in range(0, feats.shape[1], 16)] + [stream.flush()]
    streamed = torch.sigmoid(torch.cat(chunks))
    assert bf16_calls, "the streaming step ran its GEMMs in bf16"
    assert streamed.shape == fp32.shape and streamed.dtype == torch.float32
    assert _within_bf16_accuracy(streamed, fp32), _gaps(streamed, fp32)
    # The same bf16 arithmetic offline and streaming, up to float32 summation order.
    assert _gaps(streamed, bf16)[0] < BF16_MAX_GAP


@pytest.mark.parametrize("name", ["dnd_7_10", "dnd_7_10_causal"])
def test_bf16_matches_fp32_on_fold4_clips(name, shared_data):
    """The same bounds on real recordings: one fold-4 (test fold) ESC-10 clip per class, end to end."""
    from rtsed.audio.files import read_audio

    ckpt = load_checkpoint(BUNDLED_DIR / f"{name}.pt")
    detector = Detector(ckpt.config, ckpt.model).eval()
    rows = [r for r in csv.DictReader(open(shared_data / "esc10" / "meta.csv")) if r["fold"] == "4"]
    first = {}
    for r in rows:
        first.setdefault(r["class"], r["filename"])
    samples = np.concatenate([read_audio(shared_data / "esc10" / f, ckpt.config.frontend.sample_rate_hz)
                              for f in first.values()])
    with torch.no_grad():
        feats = detector.features(torch.from_numpy(samples)[None])
        fp32 = torch.sigmoid(detector.model(feats))[0]
        with precision.autocast("bf16"):
            bf16 = torch.sigmoid(detector.model(feats))[0]
    worst, mean = _gaps(bf16, fp32)
    print(f"{name} on {len(first)} fold-4 clips: max {worst:.4f}, mean {mean:.2e}, flipped "
          f"{((bf16 > 0.5) != (fp32 > 0.5)).float().mean().item():.3%}")
    assert (fp32 > 0.5).any() and _within_bf16_accuracy(bf16, fp32), (worst, mean)


def test_precision_is_checked_where_it_cannot_run(checkpoint, monkeypatch):  # noqa: F811
    with pytest.raises(ValueError, match="onnxruntime runs the exported graph in fp32"):
        make_stepper(checkpoint, "onnx", precision="bf16")
    with pytest.raises(ValueError, match="use --precision fp32"):
        precision.check_precision("bf16", "cuda")
    with pytest.raises(ValueError, match="fp32, bf16"):
        precision.check_precision("fp16")
    with pytest.raises(ValueError, match="ModelStream precision 'bf8': use one of fp32, bf16"):
        ModelStream(_model(), precision="bf8")
    monkeypatch.setattr(precision, "cpu_has_bf16_gemm", lambda: False)
    with pytest.warns(RuntimeWarning, match="emulated"):
        precision.check_precision("bf16")


def test_stepper_runs_bf16(checkpoint):  # noqa: F811
    stepper, config, _ = make_stepper(checkpoint, "torch", precision="bf16")
    assert stepper.stream.precision == "bf16"
    probs, frame_index, valid = stepper.step(torch.randn(1, 40, config.model.n_mels).numpy())
    assert probs.shape[:2] == (1, 40) and ((probs >= 0) & (probs <= 1)).all()
