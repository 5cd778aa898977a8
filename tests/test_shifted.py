"""Validation files heard a fraction of a hop later (train.shifted, ``train.tune --shifts-ms``):
the cut audio's probabilities come from the detector itself and its references move with it."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from rtsed.config import DetectorConfig, FrontendConfig, ModelConfig
from rtsed.models.checkpoint import load_checkpoint, save_checkpoint
from rtsed.models.model import SEDModel
from train.annotations import Event
from train.evaluate import predict
from train.shifted import shift_events, shifted_outputs

RATE = 16000
LABELS = ("a", "b")


def test_references_move_back_with_the_cut():
    events = [Event("f", 0.0, 0.005, "a"), Event("f", 0.004, 1.0, "b"), Event("f", 2.0, 3.5, "a")]
    moved = shift_events(events, 0.01)
    # The first ended inside the cut; the second straddles it; the third just moves.
    assert moved == (Event("f", 0.0, 0.99, "b"), Event("f", 1.99, 3.49, "a"))


@pytest.fixture
def scene(tmp_path):
    rng = np.random.default_rng(0)
    x = 0.05 * rng.standard_normal(6 * RATE)
    x[RATE:2 * RATE] += 0.5 * np.sin(2 * np.pi * 1000 * np.arange(RATE) / RATE)  # something to detect
    sf.write(tmp_path / "s.wav", x.astype(np.float32), RATE)
    model_cfg = ModelConfig.from_name("dnd_3_1_causal", n_classes=2, channels=8)
    config = DetectorConfig(frontend=FrontendConfig.for_rate(RATE), model=model_cfg, labels=LABELS)
    save_checkpoint(tmp_path / "m.pt", SEDModel(model_cfg).eval(), config)
    ckpt = load_checkpoint(tmp_path / "m.pt")
    events = (Event("s.wav", 1.0, 2.0, "a"), Event("s.wav", 3.1, 4.3, "b"))
    return ckpt, predict(ckpt, [(tmp_path / "s.wav", events)])


def test_no_shift_is_what_evaluate_predicts(scene):
    ckpt, outputs = scene
    (same,) = shifted_outputs(ckpt, outputs, 0.0)
    np.testing.assert_allclose(same.probs, outputs[0].probs, atol=1e-6)
    np.testing.assert_array_equal(same.targets, outputs[0].targets)
    assert same.events == outputs[0].events and same.key.endswith("@0ms")


def test_a_whole_hop_moves_every_frame_by_one(scene):
    # Cutting one hop (20 ms) makes frame t of the cut file frame t + 1 of the whole one: a causal
    # model gives the same probabilities once its receptive field has left the start.
    ckpt, outputs = scene
    (cut,) = shifted_outputs(ckpt, outputs, 0.02)
    whole = outputs[0]
    assert cut.probs.shape[0] == whole.probs.shape[0] - 1
    settled = 50  # frames; dnd_3_1_causal looks back far less
    np.testing.assert_allclose(cut.probs[settled:], whole.probs[1 + settled:], atol=1e-5)
    np.testing.assert_array_equal(cut.targets, whole.targets[1:])
    assert [e.onset_s for e in cut.events] == pytest.approx([0.98, 3.08])


def test_a_sub_hop_shift_changes_the_frames(scene):
    ckpt, outputs = scene
    (cut,) = shifted_outputs(ckpt, outputs, 0.01)
    assert cut.key.endswith("@10ms")
    n = min(cut.probs.shape[0], outputs[0].probs.shape[0]) - 1
    # Frames 10 ms apart see other samples: neither timeline's probabilities repeat the other's.
    assert not np.allclose(cut.probs[50:n], outputs[0].probs[50:n], atol=1e-4)
    assert not np.allclose(cut.probs[50:n], outputs[0].probs[51:n + 1], atol=1e-4)


def test_a_negative_shift_is_refused(scene):
    ckpt, outputs = scene
    with pytest.raises(ValueError, match="cuts samples off the start"):
        shifted_outputs(ckpt, outputs, -0.01)
