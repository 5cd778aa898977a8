"""CPU fast paths against the plain reference model (issue #8: every fast path keeps a test).

- rtsed.backends.cpu_head (f_dil + BN folded into the classifier, chunked, hand-written backward):
  logits, every gradient and the BN running statistics against ``classifier(temporal(h))``,
  train and eval mode, both paddings, chunk boundaries with remainders; fp64 to 1e-10 (the
  arithmetic is the same, only reordered), fp32 under the parity rule of docs/streaming.md.
- The model's CPU path (RTSED_KERNELS=auto: channels-last CNN + fast head) against
  RTSED_KERNELS=ref: logits, one optimizer step, and that the CNN really runs channels-last.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rtsed.backends import cpu_head, dispatch
from rtsed.models.model import build_model

ATOL, RTOL = 1e-5, 1e-4  # the parity rule of docs/streaming.md (fp32)


def assert_parity(actual, expected, what, atol=ATOL, rtol=RTOL):
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    worst = (err / bound).max().item()
    assert worst <= 1, f"{what}: worst error {worst:.3g} x the parity bound (max abs err {err.max().item():.3g})"


def _randomise_bn(model):
    """Non-trivial BN: running statistics away from 0/1 and affine weights of both signs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def _cpu_head(temporal, classifier, h):
    """rtsed.backends.cpu_head.dilated_head on the layer's and the classifier's tensors."""
    args, kwargs = temporal.head_arguments(classifier)
    return cpu_head.dilated_head(h, *args, **kwargs)


def _head_pair(name, dtype, training, **overrides):
    torch.manual_seed(0)
    model = build_model(name, **overrides).to(dtype)
    _randomise_bn(model)
    model.train(training)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("name", ["dnd_7_10", "dnd_7_10_causal", "dnd_3_10"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("chunk_rows", [1, 700, 6144], ids=["rows1", "rows700", "default"])
def test_head_matches_reference_fp64(monkeypatch, name, training, chunk_rows):
    """Values, all gradients and running statistics; frames (37) not a multiple of any chunk."""
    monkeypatch.setattr(cpu_head, "CHUNK_ROWS", chunk_rows)
    ref_model, fast_model = _head_pair(name, torch.float64, training, n_classes=5)
    h = torch.randn(3, 256, 37, 1, dtype=torch.float64)
    h_ref, h_fast = h.clone().requires_grad_(), h.clone().requires_grad_()
    expected = ref_model.classifier(ref_model.temporal(h_ref))
    actual = _cpu_head(fast_model.temporal, fast_model.classifier, h_fast)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad)
    torch.testing.assert_close(h_fast.grad, h_ref.grad, rtol=1e-10, atol=1e-10)
    for (pname, p_ref), p_fast in zip(ref_model.named_parameters(), fast_model.parameters()):
        if pname.startswith(("temporal.", "classifier.")):
            torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-9, atol=1e-10, msg=pname)
    bn_ref, bn_fast = ref_model.temporal.bn, fast_model.temporal.bn
    torch.testing.assert_close(bn_fast.running_mean, bn_ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn_fast.running_var, bn_ref.running_var, rtol=1e-12, atol=1e-12)
    assert bn_fast.num_batches_tracked.item() == bn_ref.num_batches_tracked.item() == int(training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_head_fp32_parity(training):
    ref_model, fast_model = _head_pair("dnd_7_10", torch.float32, training)
    h = torch.randn(2, 256, 70, 1)
    expected = ref_model.classifier(ref_model.temporal(h))
    actual = _cpu_head(fast_model.temporal, fast_model.classifier, h)
    assert_parity(actual, expected, "fp32 logits")


def test_head_without_input_grad_keeps_nothing():
    """Inference (no input needs a gradient): no r chunks are kept for a backward."""
    _, model = _head_pair("dnd_7_10", torch.float32, False)
    with torch.inference_mode():
        out = _cpu_head(model.temporal, model.classifier, torch.randn(1, 256, 20, 1))
    assert out.shape == (1, 20, 16) and out.grad_fn is None


@pytest.mark.parametrize("name", ["dnd_7_10", "dnd_7_10_causal", "base", "dws"])
def test_model_cpu_path_matches_ref(monkeypatch, name):
    """RTSED_KERNELS=auto (channels-last CNN, fast head) vs ref: eval logits in fp32 (parity
    rule), then one training step in fp64 (dropout off so the two runs see the same network):
    loss, every gradient, updated weights and BN running statistics. fp64 because train-mode BN
    gradients sum over many frames with cancellation, where fp32 orderings alone differ ~1e-3."""
    torch.manual_seed(1)
    ref_model = build_model(name, n_classes=6, dropout=0.0)
    _randomise_bn(ref_model)
    fast_model = copy.deepcopy(ref_model)
    x = torch.randn(2, 96, 40)
    y = torch.randint(0, 2, (2, 96, 6)).float()

    monkeypatch.setenv("RTSED_KERNELS", "ref")
    ref_model.eval()
    with torch.no_grad():
        expected = ref_model(x)
    monkeypatch.setenv("RTSED_KERNELS", "auto")
    fast_model.eval()
    with torch.no_grad():
        actual = fast_model(x)
    assert_parity(actual, expected, f"{name} eval logits")

    ref_model.double()
    fast_model.double()
    x, y = x.double(), y.double()

    results = []
    for backend, model in (("ref", ref_model), ("auto", fast_model)):
        monkeypatch.setenv("RTSED_KERNELS", backend)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        results.append((loss.item(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_ref, g_ref, w_ref), (loss_fast, g_fast, w_fast) = results
    assert loss_fast == pytest.approx(loss_ref, rel=1e-12)
    for n in g_ref:
        torch.testing.assert_close(g_fast[n], g_ref[n], rtol=1e-8, atol=1e-11, msg=n)
        torch.testing.assert_close(w_fast[n], w_ref[n], rtol=1e-10, atol=1e-12, msg=n)
    for m_ref, m_fast in zip(ref_model.modules(), fast_model.modules()):
        if isinstance(m_ref, torch.nn.BatchNorm2d):
            torch.testing.assert_close(m_fast.running_mean, m_ref.running_mean, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(m_fast.running_var, m_ref.running_var, rtol=1e-10, atol=1e-12)


def test_cnn_runs_channels_last_on_cpu(monkeypatch):
    """The layout switch really happens (a one-channel input needs ``.to``, not ``.contiguous``),
    and only under auto: ref keeps the paper's NCHW."""
    model = build_model("dnd_7_10").eval()
    seen = []
    hook = model.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(out))
    x = torch.randn(1, 32, 40)
    monkeypatch.setenv("RTSED_KERNELS", "auto")
    with torch.no_grad():
        model(x)
    monkeypatch.setenv("RTSED_KERNELS", "ref")
    with torch.no_grad():
        model(x)
    hook.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    assert seen[1].is_contiguous()
    assert dispatch.cpu_fast_path(x) is False  # ref asked for: no fast path


@pytest.mark.parametrize("name", ["dnd_7_10", "dnd_7_10_causal", "base", "dws"])
def test_folded_streaming_matches_reference_offline(monkeypatch, name):
    """The streaming fast path (folded BNs, pool-then-affine, f_dil + classifier as two GEMMs over
    ring patches) against the plain reference model run offline, in uneven chunks with a flush."""
    from rtsed.stream.model_stream import stream_logits

    torch.manual_seed(2)
    model = build_model(name, n_classes=7).eval()
    _randomise_bn(model)
    frames = torch.randn(90, 40)
    monkeypatch.setenv("RTSED_KERNELS", "ref")
    with torch.no_grad():
        expected = model(frames[None])[0]
    monkeypatch.setenv("RTSED_KERNELS", "auto")
    actual = stream_logits(model, frames, [1, 16, 5, 33])
    assert_parity(actual, expected, f"{name} streamed (auto) vs offline (ref)")


def test_folded_weights_follow_parameter_updates():
    """The folded-weight cache is keyed on the parameters' versions: loading new weights (or an
    optimizer step) must change the streamed output, never serve stale folds."""
    from rtsed.stream.model_stream import stream_logits

    torch.manual_seed(3)
    model = build_model("dnd_7_10_causal", n_classes=4).eval()
    frames = torch.randn(20, 40)
    before = stream_logits(model, frames)
    with torch.no_grad():
        model.blocks[0].inner_bn.running_var.mul_(4.0)
        model.temporal.bn.weight.mul_(-1.0)
        model.classifier.bias.add_(1.0)
    after = stream_logits(model, frames)
    with torch.no_grad(), dispatch.forced_backend("ref"):
        expected = model(frames[None])[0]
    assert not torch.allclose(before, after)
    assert_parity(after, expected, "after the update")


@pytest.mark.parametrize("name", ["dnd_7_10", "dnd_7_10_causal", "base_causal", "dws"])
@pytest.mark.parametrize("chunk", [7, 16])
def test_chunked_offline_inference_matches_reference(monkeypatch, name, chunk):
    """Offline inference on CPU runs the CNN in time chunks with a halo (zeroing frames outside
    the file after every block, as per-block zero padding does): equal to the reference model,
    chunk sizes that do and do not divide the length, halos that reach past both ends."""
    from rtsed.models.model import SEDModel

    torch.manual_seed(4)
    model = build_model(name, n_classes=5).eval()
    _randomise_bn(model)
    x = torch.randn(2, 61, 40)
    monkeypatch.setenv("RTSED_KERNELS", "ref")
    with torch.no_grad():
        expected = model(x)
    monkeypatch.setenv("RTSED_KERNELS", "auto")
    monkeypatch.setattr(SEDModel, "INFERENCE_CHUNK_FRAMES", chunk)
    calls = []
    hook = model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        actual = model(x)
    hook.remove()
    assert not calls, "chunked inference calls blocks through valid_time, not forward"
    assert_parity(actual, expected, f"{name} chunked ({chunk} frames)")


@pytest.mark.parametrize("name", ["dnd_7_10", "base"])
def test_eval_mode_with_autograd_matches_ref(name):
    """Eval mode with gradients on (frozen BN statistics, e.g. fine-tuning or saliency): the
    folded path's in-place shortcuts must leave autograd's saved tensors alone, and its input
    gradient must equal the reference's (fp64)."""
    torch.manual_seed(3)
    model = build_model(name, n_classes=5, dropout=0.0).double().eval()
    x = torch.randn(2, 40, 40, dtype=torch.float64)
    grads = {}
    for backend in ("ref", "auto"):
        x_in = x.clone().requires_grad_(True)
        with dispatch.forced_backend(backend):
            model(x_in).square().sum().backward()
        grads[backend] = x_in.grad
    assert_parity(grads["auto"], grads["ref"], "input gradient", atol=1e-10, rtol=1e-10)
