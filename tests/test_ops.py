"""The kernel dispatch point: RTSED_KERNELS chooses, and asking for what cannot run is an error."""

import pytest
import torch

from rtsed.backends import dispatch
from rtsed.models.model import build_model


def test_ref_and_auto_run_on_cpu(monkeypatch):
    model = build_model("dnd_3_10", channels=16).eval()
    x = torch.randn(1, 30, 40)
    monkeypatch.setenv("RTSED_KERNELS", "ref")
    ref = model(x)
    monkeypatch.setenv("RTSED_KERNELS", "auto")
    # auto on CPU takes the CPU fast paths (same arithmetic, reordered: tests/test_fast_paths.py)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    for op in dispatch.OPS:
        assert dispatch.backend_for(op, x) == "ref"  # CPU tensors never go to Triton under auto
    assert dispatch.cpu_fast_path(x)


def test_triton_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setenv("RTSED_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = build_model("dnd_3_10", channels=16)
    with pytest.raises(dispatch.KernelUnavailableError, match="RTSED_KERNELS=triton"):
        model(torch.randn(1, 30, 40))


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("RTSED_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="RTSED_KERNELS"):
        dispatch.requested_backend()


def test_auto_never_sends_cpu_tensors_to_the_interpreter(monkeypatch):
    monkeypatch.setenv("RTSED_KERNELS", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(1, 1, 8, 40)
    assert all(dispatch.backend_for(op, x) == "ref" for op in dispatch.OPS)
