"""--precision bf16 at inference (rtsed.backends.precision): the GEMMs in bf16 under CPU autocast, the rest
float32. Checked against fp32 at bf16's accuracy (not the fp32 parity rule: bf16 keeps 8 bits of
mantissa), for the offline model, the streaming step and the tools' stepper; and that bf16 is
refused where it has not been built or measured (onnxruntime, CUDA) with a message naming the fix.
"""

from __future__ import annotations

import pytest
import torch

import rtsed.backends.cpu as cpu
from rtsed.backends import precision
from rtsed.serve.engine import make_stepper
from rtsed.models.model import build_model
from rtsed.stream.model_stream import ModelStream

# tests/ is not a package: pytest puts this folder on sys.path, so the engine tests' fixture is shared.
from test_engine import checkpoint  # noqa: F401  (fixture)


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


def test_offline_and_streaming_bf16_stay_within_bf16_accuracy(bf16_calls):
    model = _model()
    x = torch.randn(1, 150, 40)
    with torch.no_grad():
        fp32 = torch.sigmoid(model(x))
        with precision.autocast("bf16"):
            bf16 = torch.sigmoid(model(x))
    assert bf16_calls, "the offline forward ran its GEMMs in bf16"
    assert bf16.dtype == torch.float32
    offline_gap = (bf16 - fp32).abs().max().item()
    assert 0 < offline_gap < 2e-2

    with torch.inference_mode(), precision.autocast("bf16"):  # folds made there keep no version counter
        torch.testing.assert_close(torch.sigmoid(model(x)), bf16, rtol=0, atol=1e-6)

    bf16_calls.clear()
    stream = ModelStream(model, precision="bf16")
    chunks = [stream.push(x[0, i:i + 16]) for i in range(0, 150, 16)] + [stream.flush()]
    streamed = torch.sigmoid(torch.cat(chunks))
    assert bf16_calls, "the streaming step ran its GEMMs in bf16"
    assert streamed.shape == fp32[0].shape and streamed.dtype == torch.float32
    assert (streamed - fp32[0]).abs().max().item() < 2e-2
    # The same bf16 arithmetic offline and streaming, up to float32 summation order.
    assert (streamed - bf16[0]).abs().max().item() < 1e-2


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
