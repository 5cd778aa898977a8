"""rtsed.detect: offline detection over files and folders, TSV/JSON output, plots, errors."""

import csv
import json

import numpy as np
import pytest
import soundfile as sf

from rtsed.models.bundled import ModelNotFoundError, resolve_model
from rtsed.cli.detect import detect_file, main
from rtsed.serve.engine import make_stepper

# tests/ is not a package: pytest puts this folder on sys.path, so the engine tests' fixture is shared.
from engine_helpers import RATE, offline_events, scene  # tests/ is on sys.path


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "a.wav", scene(seed=0), RATE)
    stereo_44k = np.stack([scene(seed=1)] * 2, axis=1)
    import soxr

    sf.write(tmp_path / "sub" / "b.flac", soxr.resample(stereo_44k, RATE, 44100), 44100)
    (tmp_path / "notes.txt").write_text("not audio")
    return tmp_path


def read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_folder_to_tsv_with_relative_names(checkpoint, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "events.tsv"
    assert main([str(folder), "--model", str(checkpoint), "--output", str(out)]) == 0
    rows = read_tsv(out)
    assert rows and set(rows[0]) >= {"filename", "onset", "offset", "event_label"}
    assert {r["filename"] for r in rows} <= {"a.wav", "sub/b.flac"}
    expected, _ = offline_events(checkpoint, scene(seed=0))
    got = [(float(r["onset"]), float(r["offset"]), r["event_label"]) for r in rows if r["filename"] == "a.wav"]
    assert got == [(round(e.onset_s, 3), round(e.offset_s, 3), e.label) for e in expected]


def test_single_file_json_and_plot(checkpoint, folder, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("out")
    ref = out_dir / "ref.tsv"
    ref.write_text("filename\tonset\toffset\tevent_label\na.wav\t1.0\t2.5\ttone\n")
    code = main([str(folder / "a.wav"), "--model", str(checkpoint), "--format", "json",
                 "--output", str(out_dir / "e.json"), "--plot", str(out_dir / "a.png"), "--reference", str(ref)])
    assert code == 0
    data = json.loads((out_dir / "e.json").read_text())
    assert data["labels"] == ["tone", "noise", "click"]
    expected, _ = offline_events(checkpoint, scene(seed=0))
    assert expected and len(data["events"]) == len(expected)  # something to check, and all of it
    assert all(e["filename"] == "a.wav" for e in data["events"])
    png = (out_dir / "a.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_resampled_stereo_file_matches_mono_original(checkpoint, folder):
    """b.flac is a 44.1 kHz stereo copy of a 16 kHz signal: downmix + resample recovers it."""
    stepper, config, _ = make_stepper(checkpoint, "torch")
    events, engine = detect_file(folder / "sub" / "b.flac", stepper, config, keep=True)
    expected, probs = offline_events(checkpoint, scene(seed=1))
    assert engine.probabilities().shape[0] in (probs.shape[0], probs.shape[0] - 1)
    assert [e.label for e in events] == [e.label for e in expected]
    for a, b in zip(events, expected):
        assert abs(a.onset_s - b.onset_s) <= 0.04 and abs(a.offset_s - b.offset_s) <= 0.04


def test_errors_are_one_line_messages(checkpoint, tmp_path, capsys):
    assert main([str(tmp_path / "missing.wav"), "--model", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "missing.wav: not found" in err and "decode" not in err
    (tmp_path / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    assert main([str(tmp_path / "broken.wav"), "--model", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert "broken.wav: " in err and "cannot decode audio" in err and "Traceback" not in err
    assert main([str(tmp_path / "broken.wav"), "--model", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert "no_such_model" in err and "Bundled detectors" in err


def test_resolve_model_prefers_paths_then_bundled(checkpoint, tmp_path, monkeypatch):
    assert resolve_model(checkpoint) == checkpoint
    monkeypatch.setattr("rtsed.models.bundled.BUNDLED_DIR", tmp_path)
    (tmp_path / "tiny.pt").write_bytes(checkpoint.read_bytes())
    monkeypatch.chdir(tmp_path.parent)
    assert resolve_model("tiny") == tmp_path / "tiny.pt"
    assert resolve_model("tiny.pt") == tmp_path / "tiny.pt"
    with pytest.raises(ModelNotFoundError, match="Bundled detectors: tiny"):
        resolve_model("huge.pt")


def test_onnx_backend_gives_the_torch_events(checkpoint, folder, tmp_path_factory, monkeypatch):
    out = tmp_path_factory.mktemp("onnx")
    monkeypatch.setenv("RTSED_ONNX_CACHE", str(out / "cache"))
    assert main([str(folder / "a.wav"), "--model", str(checkpoint), "--output", str(out / "t.tsv")]) == 0
    assert main([str(folder / "a.wav"), "--model", str(checkpoint), "--backend", "onnx",
                 "--output", str(out / "o.tsv")]) == 0
    torch_rows, onnx_rows = read_tsv(out / "t.tsv"), read_tsv(out / "o.tsv")
    assert torch_rows and [(r["onset"], r["offset"], r["event_label"]) for r in torch_rows] == \
        [(r["onset"], r["offset"], r["event_label"]) for r in onnx_rows]
    assert list((out / "cache").glob("*-step-r*.onnx")), "the checkpoint's step graph is exported once and cached"
