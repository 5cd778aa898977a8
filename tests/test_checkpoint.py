"""Checkpoints: round trip, weights_only loading, rebuild from own config, and every broken file
giving an error that names the file and the problem."""

import os
import re
import zipfile

import pytest
import torch

import rtsed
from rtsed.models.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from rtsed.config import DecoderConfig, DetectorConfig, FrontendConfig, ModelConfig, NormalizationStats

LABELS = tuple(f"class_{i}" for i in range(5))


def make_config(name="dnd_3_10_causal") -> DetectorConfig:
    return DetectorConfig(
        frontend=FrontendConfig.for_rate(16000),
        model=ModelConfig.from_name(name, n_classes=len(LABELS)),
        labels=LABELS,
        normalization=NormalizationStats(mean=tuple(float(i) for i in range(40)), std=(2.0,) * 40),
        decoder=DecoderConfig(on_thresholds=(0.6,) * 5, off_thresholds=(0.4,) * 5, min_event_s=0.1),
    )


def trained_like(config: DetectorConfig) -> rtsed.SEDModel:
    model = rtsed.SEDModel(config.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("name", ["dnd_3_10_causal", "base", "dil_5_1"])
def test_round_trip_rebuilds_the_same_model(tmp_path, name):
    config = make_config(name)
    model = trained_like(config)
    path = save_checkpoint(tmp_path / "m.pt", model, config, metadata={"epoch": 7, "val_loss": 0.25})
    # Plain torch can read it with weights_only=True: nothing but tensors and plain types inside.
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION
    ckpt = load_checkpoint(path)
    assert ckpt.config == config
    assert ckpt.metadata == {"epoch": 7, "val_loss": 0.25}
    assert not ckpt.model.training
    x = torch.randn(1, 60, 40)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(x), model(x), rtol=0, atol=0)
    assert rtsed.load_model(path).config == config.model


def test_load_detector_carries_front_end_normalisation_and_labels(tmp_path):
    config = make_config()
    model = trained_like(config)
    path = save_checkpoint(tmp_path / "m.pt", model, config)
    detector = rtsed.load_detector(path)
    assert detector.labels == LABELS
    assert detector.config.frontend.sample_rate_hz == 16000
    audio = torch.randn(16000)
    with torch.no_grad():
        expected = model(((detector.frontend(audio) - detector.norm_mean) / 2.0)[None])[0]
    torch.testing.assert_close(detector.detect_logits(audio), expected)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    config = make_config()
    model = trained_like(config)
    path = tmp_path / "sub" / "m.pt"
    save_checkpoint(path, model, config)
    save_checkpoint(path, model, config)  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.pt"]


def test_save_rejects_a_config_of_another_model(tmp_path):
    config = make_config("dnd_3_10_causal")
    with pytest.raises(ValueError, match="does not describe"):
        save_checkpoint(tmp_path / "m.pt", trained_like(make_config("base")), config)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file_names_the_file(tmp_path):
    config = make_config()
    path = save_checkpoint(tmp_path / "m.pt", trained_like(config), config)
    data = path.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert "truncated.pt" in str(info.value) and "truncated" in str(info.value)


def test_garbage_and_foreign_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    bare = tmp_path / "bare.pt"
    torch.save(rtsed.build_model("dnd_3_10").state_dict(), bare)
    with pytest.raises(CheckpointError, match="not an rtsed checkpoint"):
        load_checkpoint(bare)


class Unsafe:
    """Any class that is not a tensor or plain type: weights_only loading must refuse it."""


class RunsACommand:
    """A pickle that would call os.system when loaded without weights_only."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "rtsed-checkpoint", "format_version": 1, "obj": Unsafe()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)


def test_code_executing_pickle_is_refused_naming_the_blocked_call(tmp_path):
    """The message names the call torch blocked (os.system is posix.system), not torch's preamble
    about its changed default."""
    path = tmp_path / "evil.pt"
    torch.save({"format": "rtsed-checkpoint", "format_version": 1, "obj": RunsACommand()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "evil.pt" in message and re.search(r"(posix|os)\.system", message), message
    assert "PyTorch 2.6" not in message and "re-save it with rtsed.save_checkpoint" in message, message


def test_other_format_version(tmp_path):
    config = make_config()
    path = save_checkpoint(tmp_path / "m.pt", trained_like(config), config)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"m\.pt.*format version 2"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    config = make_config("dnd_3_10_causal")
    path = save_checkpoint(tmp_path / "m.pt", trained_like(config), config)
    payload = torch.load(path, weights_only=True)
    payload["config"]["model"]["dil_kernel"] = 5  # the weights are for K = 3
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "m.pt" in msg and "wrong shapes" in msg and "temporal.conv.weight" in msg


def test_missing_weights_and_nan_weights(tmp_path):
    config = make_config()
    path = save_checkpoint(tmp_path / "m.pt", trained_like(config), config)
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]["classifier.weight"]
    torch.save(payload, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing.pt.*missing \['classifier.weight'\]"):
        load_checkpoint(tmp_path / "missing.pt")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["classifier.bias"][0] = float("nan")
    del payload["content_sha256"]  # as written before the hash (with it, the hash check speaks first)
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"nan.pt.*non-finite"):
        load_checkpoint(tmp_path / "nan.pt")


def test_invalid_config_in_file(tmp_path):
    config = make_config()
    path = save_checkpoint(tmp_path / "m.pt", trained_like(config), config)
    payload = torch.load(path, weights_only=True)
    payload["config"]["labels"] = ["only_one"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"m\.pt: invalid config.*1 labels"):
        load_checkpoint(path)


def test_zip_member_corruption_is_reported(tmp_path):
    config = make_config()
    path = save_checkpoint(tmp_path / "m.pt", trained_like(config), config)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    assert any(n.endswith("data.pkl") for n in names)
    data = bytearray(path.read_bytes())
    data[40:80] = b"\x00" * 40  # damage the first member's header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="m.pt"):
        load_checkpoint(path)


def test_metadata_is_stored_as_plain_data(tmp_path):
    """str subclasses (torch.__version__) and numpy scalars would make the file unloadable under
    weights_only=True; they are stored as plain types, and other objects are refused at save."""
    import numpy as np

    config = make_config()
    model = trained_like(config)
    meta = {"torch": torch.__version__, "f1": np.float32(0.5), "shape": (1, 2)}
    path = save_checkpoint(tmp_path / "m.pt", model, config, metadata=meta)
    loaded = load_checkpoint(path).metadata
    assert loaded == {"torch": str(torch.__version__), "f1": 0.5, "shape": [1, 2]}
    assert type(loaded["torch"]) is str
    with pytest.raises(TypeError, match="metadata.obj"):
        save_checkpoint(tmp_path / "x.pt", model, config, metadata={"obj": Unsafe()})


def test_checkpoint_files_get_normal_permissions(tmp_path):
    """Atomic saving goes through mkstemp (mode 0600); the final file follows the umask instead."""
    import os
    import stat

    config = make_config()
    path = save_checkpoint(tmp_path / "m.pt", trained_like(config), config)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_problem(tmp_path):
    """A real 256 KiB tmpfs: a state that does not fit is refused with a message naming the file
    and the full disk (torch's own is "[enforce fail at inline_container.cc] unexpected pos"),
    the previous file stays whole and no temporary file is left."""
    from mounts import tmpfs  # tests/ is on sys.path (not a package)
    from rtsed.atomic import OutputError
    from rtsed.models.checkpoint import atomic_torch_save

    with tmpfs(tmp_path / "small", "size=256k") as disk:
        path = disk / "last.pt"
        atomic_torch_save({"w": torch.arange(1000.0)}, path)
        with pytest.raises(OutputError) as info:
            atomic_torch_save({"w": torch.zeros(200_000)}, path)  # 800 kB
        message = str(info.value)
        assert str(path) in message and "disk is full" in message, message
        assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(1000.0))
        assert [p.name for p in disk.iterdir()] == ["last.pt"]
