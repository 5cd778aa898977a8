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


# The decision on plain facts: what a CUDA machine would answer, checked without one.
CUDA_FACTS = dict(triton_installed=True, interpret=False, kernel_exists=True)


@pytest.mark.parametrize("op", dispatch.OPS)
def test_cuda_float32_and_float16_go_to_triton(op):
    for dtype in (torch.float32, torch.float16):
        assert dispatch.triton_decision(op, "auto", "cuda", dtype, **CUDA_FACTS) == "triton"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cuda_dtypes_the_kernels_lack_fall_back_under_auto_and_fail_clearly_when_asked(dtype):
    for op in dispatch.OPS:
        assert dispatch.triton_decision(op, "auto", "cuda", dtype, **CUDA_FACTS) == "ref"
        with pytest.raises(dispatch.KernelUnavailableError, match=f"float32 or float16, not {dtype}"):
            dispatch.triton_decision(op, "triton", "cuda", dtype, **CUDA_FACTS)


def test_cuda_shapes_outside_the_kernels_and_int32_overflow_fall_back():
    decide = dispatch.triton_decision
    assert decide("dws_block", "auto", "cuda", torch.float32, shape_problem="pool 200 too big", **CUDA_FACTS) == "ref"
    limit = dispatch.TRITON_MAX_ELEMENTS
    assert decide("dilated_step", "auto", "cuda", torch.float32, elements=limit, **CUDA_FACTS) == "triton"
    assert decide("dilated_step", "auto", "cuda", torch.float32, elements=limit + 1, **CUDA_FACTS) == "ref"
    with pytest.raises(dispatch.KernelUnavailableError, match="int32"):
        decide("dilated_step", "triton", "cuda", torch.float32, elements=limit + 1, **CUDA_FACTS)
    missing = dict(CUDA_FACTS, triton_installed=False)
    assert decide("dws_block", "auto", "cuda", torch.float32, **missing) == "ref"
    assert decide("dws_block", "auto", "cuda", torch.float32, **dict(CUDA_FACTS, kernel_exists=False)) == "ref"
    assert decide("dws_block", "auto", "cpu", torch.float32, **CUDA_FACTS) == "ref"


def test_the_ops_hand_their_real_shapes_to_the_decision(monkeypatch):
    """The facts the dispatch functions gather (a stand-in decision records them): the ring step
    of 10,000 streams x 16 frames into f_dil 7|10 (C_out 256, W 84) alone is 3.4e9 elements, past
    int32; fused with the 16-class classifier it indexes 10,000 x 16 x 16 logits, so it runs in Triton."""
    seen = []
    decide = dispatch.triton_decision

    def stand_in(op, requested, device_type, dtype, **facts):
        seen.append((op, dtype, facts))
        return "ref"

    monkeypatch.setattr(dispatch, "triton_decision", stand_in)
    monkeypatch.setenv("RTSED_KERNELS", "triton")  # so that CPU tensors reach the decision
    h = torch.empty(10_000, 256, 16, 1)
    assert dispatch.dilated_step_logits(h, False, kernel=7, classes=16) == dispatch.REFERENCE
    op, dtype, facts = seen[-1]
    assert op == "dilated_step_logits" and facts["elements"] == h.numel()  # the input: more than the logits
    assert decide(op, "auto", "cuda", dtype, elements=facts["elements"], **CUDA_FACTS) == "triton"
    dispatch.dilated_step(h[..., 0].transpose(1, 2), 256, 7, 3)
    op, dtype, facts = seen[-1]
    assert op == "dilated_step" and facts["elements"] == 10_000 * 16 * 256 * 84 > dispatch.TRITON_MAX_ELEMENTS
    x = torch.empty(2, 1, 64, 40, dtype=torch.float64)
    dispatch.frequency_block(x, True, False, 5, 256, 200)
    op, dtype, facts = seen[-1]
    assert op == "dws_block" and dtype == torch.float64 and "pool 200" in facts["shape_problem"]
    dispatch.dilated_temporal(torch.empty(2, 3, 70, 256), 256, 7, 3)
    assert "(B, 1, T', C)" in seen[-1][2]["shape_problem"]


def test_a_float64_model_asking_for_triton_is_told_why(monkeypatch):
    """Wired end to end under the interpreter's facts (TRITON_INTERPRET=1 lets CPU tensors through
    the device check): a float64 model stops at the dtype, with the fix named."""
    pytest.importorskip("triton")
    monkeypatch.setenv("RTSED_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = build_model("dnd_3_10", channels=16).double()
    with pytest.raises(dispatch.KernelUnavailableError, match="not torch.float64.*RTSED_KERNELS=ref or auto"):
        model(torch.randn(1, 30, 40, dtype=torch.float64))
