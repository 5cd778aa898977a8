"""Weights files that were changed after rtsed wrote them: real files with flipped bytes that still
parse are refused by their content hash, naming the file; files without a hash (older ones, the
bundled detectors) still load, but absurd magnitudes are refused whatever the file says."""

import numpy as np
import pytest
import torch

import rtsed
from rtsed.cli.export import main as export_main
from rtsed.models.checkpoint import CheckpointError, load_checkpoint
from rtsed.models.integrity import MAX_ABS_WEIGHT
from rtsed.stream.onnx_export import export_onnx
from rtsed.stream.onnx_runtime import OnnxFile, OnnxModelError



def _flip_exponent_bit(data: bytes, weight: np.ndarray) -> bytes:
    """``data`` with one exponent bit of ``weight``'s first float flipped where its bytes occur:
    0.1 becomes about 3.4e37, a value that still parses."""
    needle = weight.astype(np.float32).tobytes()[:64]
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "the weight's bytes should occur once"
    out = bytearray(data)
    out[at + 3] ^= 0x40  # little-endian float32: byte 3 holds the sign and the exponent's top bits
    return bytes(out)


def _a_weight(state) -> tuple[str, np.ndarray]:
    name = "classifier.weight"
    return name, state[name].numpy()


def test_checkpoint_with_a_flipped_byte_is_refused_by_its_hash(checkpoint, tmp_path):
    payload = torch.load(checkpoint, weights_only=True)
    assert len(payload["content_sha256"]) == 64
    load_checkpoint(checkpoint)
    name, w = _a_weight(payload["state_dict"])
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(_flip_exponent_bit(checkpoint.read_bytes(), w))
    parsed = torch.load(bad, weights_only=True)  # still parses, with one absurd weight
    assert float(parsed["state_dict"][name].abs().max()) > MAX_ABS_WEIGHT
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(bad)
    message = str(exc.value)
    assert str(bad) in message and "modified or corrupted after it was written" in message
    assert "re-download or re-export it" in message


def test_small_changes_are_caught_by_the_hash_alone(checkpoint, tmp_path):
    """A flipped low mantissa bit changes a weight by 1e-7: no magnitude check could see it."""
    data = bytearray(checkpoint.read_bytes())
    w = _a_weight(torch.load(checkpoint, weights_only=True)["state_dict"])[1]
    at = bytes(data).find(w.tobytes()[:64])
    data[at] ^= 0x01
    bad = tmp_path / "nudged.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="nudged.pt: content hash mismatch"):
        load_checkpoint(bad)


def test_files_without_a_hash_load_but_absurd_weights_are_refused(checkpoint, tmp_path):
    payload = torch.load(checkpoint, weights_only=True)
    del payload["content_sha256"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    ckpt = load_checkpoint(old)  # as written before the hash existed
    assert ckpt.config.labels == ("tone", "noise", "click")
    name, w = _a_weight(payload["state_dict"])
    bad = tmp_path / "old_flipped.pt"
    bad.write_bytes(_flip_exponent_bit(old.read_bytes(), w))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(bad)
    message = str(exc.value)
    assert str(bad) in message and "absurd magnitude" in message and name in message
    # The bundled detectors carry the hash (train.bundle writes it) and load.
    hashed = {name: "content_sha256" in torch.load(rtsed.models.bundled.resolve_model(name), weights_only=True)
              for name in ("dnd_7_10", "dnd_7_10_causal")}
    assert hashed == {"dnd_7_10": True, "dnd_7_10_causal": True}
    for name in hashed:
        load_checkpoint(rtsed.models.bundled.resolve_model(name))


def test_onnx_file_with_a_flipped_byte_is_refused(checkpoint, tmp_path):
    import onnx

    ckpt = load_checkpoint(checkpoint)
    good = export_onnx(ckpt.model, ckpt.config, tmp_path / "m.onnx")
    meta = OnnxFile.open(good).meta
    assert len(meta["rtsed_content_sha256"]) == 64
    proto = onnx.load(str(good))
    init = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    w = onnx.numpy_helper.to_array(init)
    bad = tmp_path / "flipped.onnx"
    bad.write_bytes(_flip_exponent_bit(good.read_bytes(), w.reshape(-1)))
    onnx.load(str(bad))  # still parses
    with pytest.raises(OnnxModelError) as exc:
        OnnxFile.open(bad)
    assert str(bad) in str(exc.value) and "modified or corrupted after it was written" in str(exc.value)

    # Without the hash (an older export): loads, unless a weight is absurd.
    for p in list(proto.metadata_props):
        if p.key == "rtsed_content_sha256":
            proto.metadata_props.remove(p)
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    OnnxFile.open(old)
    old_bad = tmp_path / "old_flipped.onnx"
    old_bad.write_bytes(_flip_exponent_bit(old.read_bytes(), w.reshape(-1)))
    with pytest.raises(OnnxModelError, match="old_flipped.onnx: weights of absurd magnitude"):
        OnnxFile.open(old_bad)


def test_export_takes_bundled_model_names(tmp_path, capsys):
    out = tmp_path / "causal.onnx"
    assert export_main(["--model", "dnd_7_10_causal.pt", "--out", str(out), "--no-check"]) == 0
    assert OnnxFile.open(out).config.labels == load_checkpoint(rtsed.models.bundled.resolve_model("dnd_7_10_causal")).config.labels
    assert export_main(["--model", "no_such_model", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "Bundled detectors" in capsys.readouterr().err
    assert export_main(["--model", "dnd_7_10_causal", "--out", str(tmp_path / "missing" / "x.onnx")]) == 2
    assert "mkdir -p" in capsys.readouterr().err
