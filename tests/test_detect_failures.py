"""rtsed.detect when files or disks fail: nothing computed is lost, messages name the problem and
the fix, exit codes say what happened (rtsed.cli.detect.EXIT_CODES).

Real components throughout: corrupt files written to disk, a tmpfs filled to the last page for a
full disk, a tmpfs mounted read-only (chmod does not stop root), and subprocesses whose peak RSS
shows that memory does not grow with the length of the file."""

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import rtsed.cli.detect as detect
from rtsed.atomic import OutputError, check_writable, write_atomically
from rtsed.audio.files import read_audio
from rtsed.cli.detect import EXIT_CODES, STEP_FRAMES, build_parser, detect_file, main
from rtsed.serve.decode import SoundEvent
from rtsed.serve.engine import DetectionEngine, make_stepper

from mounts import tmpfs  # tests/ is on sys.path (not a package)
from engine_helpers import RATE, scene  # tests/ is on sys.path

REPO = Path(__file__).resolve().parents[1]


def rows_of(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text), delimiter="\t"))


@pytest.fixture()
def mixed_folder(tmp_path):
    """Two good files and three bad ones, each bad in its own real way."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    sf.write(root / "a.wav", scene(seed=0), RATE)
    sf.write(root / "sub" / "c.wav", scene(seed=2), RATE)
    (root / "b_junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    x = scene(seed=3)
    x[RATE] = np.nan
    sf.write(root / "d_nan.wav", x, RATE, subtype="FLOAT")
    flac = root / "e_scrambled.flac"
    sf.write(flac, scene(seed=4), RATE)
    data = bytearray(flac.read_bytes())
    data[len(data) // 2:len(data) // 2 + 3000] = bytes(3000)
    flac.write_bytes(bytes(data))
    return root


def test_a_folder_with_bad_files_keeps_the_good_files_events(checkpoint, mixed_folder, tmp_path, capsys):
    good = tmp_path / "good"
    (good / "sub").mkdir(parents=True)
    for name in ("a.wav", "sub/c.wav"):
        (good / name).write_bytes((mixed_folder / name).read_bytes())
    assert main([str(good), "--model", str(checkpoint), "--output", str(tmp_path / "good.tsv")]) == 0
    expected = rows_of((tmp_path / "good.tsv").read_text())
    assert {r["filename"] for r in expected} == {"a.wav", "sub/c.wav"}
    capsys.readouterr()

    out = tmp_path / "events.tsv"
    assert main([str(mixed_folder), "--model", str(checkpoint), "--output", str(out)]) == detect.EXIT_FILES_FAILED
    assert rows_of(out.read_text()) == expected
    err = capsys.readouterr().err
    assert "3 of 5 file(s) failed" in err
    assert "b_junk.wav: " in err and "cannot decode audio" in err
    assert "d_nan.wav: " in err and "non-finite" in err
    assert "e_scrambled.flac: " in err and "decoding failed at" in err
    assert "Traceback" not in err

    assert main([str(mixed_folder), "--model", str(checkpoint), "--format", "json",
                 "--output", str(tmp_path / "e.json")]) == detect.EXIT_FILES_FAILED
    data = json.loads((tmp_path / "e.json").read_text())
    assert {f["filename"] for f in data["failed"]} == {"b_junk.wav", "d_nan.wav", "e_scrambled.flac"}
    assert len(data["events"]) == len(expected)


def test_exit_codes_are_documented_in_help():
    text = build_parser().format_help()
    assert EXIT_CODES.splitlines()[0] in text
    for code in ("0 ", "1 ", "2 ", "3 ", "130 "):
        assert f"\n  {code}" in text


def _no_compute(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("detection ran although the output path was unusable")

    monkeypatch.setattr(detect, "detect_file", fail)
    monkeypatch.setattr(detect, "read_reference", fail)


def test_output_path_is_checked_before_any_compute(checkpoint, mixed_folder, tmp_path, capsys, monkeypatch):
    _no_compute(monkeypatch)
    missing = tmp_path / "no" / "such" / "dir" / "events.tsv"
    assert main([str(mixed_folder), "--model", str(checkpoint), "--output", str(missing)]) == detect.EXIT_NOTHING_RUN
    err = capsys.readouterr().err
    assert f"the folder {missing.parent} does not exist" in err and f"mkdir -p {missing.parent}" in err
    assert main([str(mixed_folder), "--model", str(checkpoint), "--output", str(tmp_path)]) == detect.EXIT_NOTHING_RUN
    assert "is a folder: give a file name" in capsys.readouterr().err
    assert main([str(mixed_folder), "--model", str(checkpoint), "--plot", str(missing.with_suffix(".png"))]) == 2
    assert "--plot" in capsys.readouterr().err
    assert not missing.parent.exists()




def test_read_only_output_folder_is_refused_before_compute(checkpoint, mixed_folder, tmp_path, capsys, monkeypatch):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        with pytest.raises(OutputError, match="read-only file system"):
            check_writable(ro / "events.tsv")
        _no_compute(monkeypatch)
        code = main([str(mixed_folder), "--model", str(checkpoint), "--output", str(ro / "events.tsv")])
        assert code == detect.EXIT_NOTHING_RUN
        err = capsys.readouterr().err
        assert f"{ro / 'events.tsv'}" in err and "read-only file system" in err and "writable disk" in err


def _fill(folder: Path) -> None:
    """Write until the file system has no page left."""
    with contextlib.suppress(OSError), open(folder / "filler", "wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 4096)


def test_full_disk_leaves_the_old_output_whole_and_the_events_on_stdout(checkpoint, mixed_folder, tmp_path, capsys):
    good = tmp_path / "good.wav"
    good.write_bytes((mixed_folder / "a.wav").read_bytes())
    assert main([str(good), "--model", str(checkpoint)]) == 0
    expected = capsys.readouterr().out
    assert len(rows_of(expected)) >= 1
    with tmpfs(tmp_path / "small", "size=64k") as disk:
        old = "filename\tonset\toffset\tevent_label\nold.wav\t1.000\t2.000\tdog\n" * 20
        (disk / "events.tsv").write_text(old)
        _fill(disk)
        code = main([str(good), "--model", str(checkpoint), "--output", str(disk / "events.tsv")])
        captured = capsys.readouterr()
        assert code == detect.EXIT_OUTPUT_FAILED
        assert (disk / "events.tsv").read_text() == old, "the old file must be left whole"
        assert sorted(p.name for p in disk.iterdir()) == ["events.tsv", "filler"], "no temporary file left"
        assert "disk is full" in captured.err and "left as it was" in captured.err
        assert "follow on stdout" in captured.err
        assert captured.out == expected


def test_write_atomically_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.tsv"
    target.write_text("old\n")

    def half(f):
        f.write("new, cut")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        write_atomically(target, half)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.tsv"]
    write_atomically(target, lambda f: f.write("new\n"))
    assert target.read_text() == "new\n" and oct(target.stat().st_mode & 0o777) != "0o600"


def test_input_warnings_name_the_file(checkpoint, tmp_path, capsys):
    """Cut short, below the model's rate, clipped: events still come, with one warning line each."""
    import soxr

    folder = tmp_path / "in"
    folder.mkdir()
    sf.write(folder / "cut.wav", scene(seed=0), RATE, subtype="PCM_16")
    whole = (folder / "cut.wav").read_bytes()
    (folder / "cut.wav").write_bytes(whole[:len(whole) // 2])
    sf.write(folder / "phone.wav", soxr.resample(scene(seed=1), RATE, 8000), 8000)
    sf.write(folder / "loud.wav", np.clip(8 * scene(seed=2), -1, 1), RATE, subtype="PCM_16")
    out = tmp_path / "events.tsv"
    assert main([str(folder), "--model", str(checkpoint), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 3, err
    assert any("cut.wav: truncated" in w for w in warnings)
    assert any("phone.wav: recorded at 8000 Hz, below the model's 16000 Hz" in w for w in warnings)
    assert any("loud.wav: clipped" in w for w in warnings)
    assert {r["filename"] for r in rows_of(out.read_text())} <= {"cut.wav", "phone.wav", "loud.wav"}


def test_streamed_file_gives_the_whole_file_events_exactly(checkpoint, tmp_path):
    """The old path (the whole file read, then pushed in STEP_FRAMES-hop blocks) and the streamed
    one give the same events, to the bit: a 44.1 kHz stereo file, read in blocks that do not
    divide the step."""
    import soxr

    x = np.stack([scene(seconds=9.0, seed=5), scene(seconds=9.0, seed=6)], axis=1)
    path = tmp_path / "s.wav"
    sf.write(path, soxr.resample(x, RATE, 44100), 44100, subtype="FLOAT")
    stepper, config, _ = make_stepper(checkpoint, "torch")
    stepper.reset()
    engine = DetectionEngine(stepper, config, frames_per_step=STEP_FRAMES, keep_probabilities=True)
    samples = read_audio(path, RATE)
    block = config.frontend.hop_samples * STEP_FRAMES
    items = []
    for start in range(0, samples.shape[0], block):
        items += engine.push_audio(samples[start:start + block])
    items += engine.flush()
    expected = sorted((e for e in items if isinstance(e, SoundEvent)), key=lambda e: (e.onset_s, e.label))
    probs = engine.probabilities()
    assert expected
    events, streamed = detect_file(path, stepper, config, keep=True)
    assert events == expected
    np.testing.assert_array_equal(streamed.probabilities(), probs)


_PEAK_RSS = """
import resource, sys
from rtsed.cli.detect import main
code = main([sys.argv[1], "--model", sys.argv[2], "--output", sys.argv[3]])
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _write_long(path: Path, seconds: float) -> None:
    """48 kHz stereo 16-bit noise with tone bursts, written in blocks."""
    rng = np.random.default_rng(0)
    rate, block = 48000, 48000 * 10
    with sf.SoundFile(path, "w", rate, 2, subtype="PCM_16") as f:
        for start in range(0, int(seconds * rate), block):
            t = (start + np.arange(block)) / rate
            x = 0.02 * rng.standard_normal((block, 2)) + (0.3 * np.sin(2 * np.pi * 1000 * t) * ((t % 30) < 3))[:, None]
            f.write(x.astype(np.float32))


def test_peak_memory_does_not_grow_with_file_length(checkpoint, tmp_path):
    """0.5 and 4 minutes of 48 kHz stereo: reading the whole file would add 3.5 x 60 x 48000 x 2 x 4 B =
    81 MB (float32) to the longer run; streamed, the peaks stay within a small margin."""
    peaks = {}
    for minutes in (0.5, 4):
        audio = tmp_path / f"long_{minutes}.wav"
        _write_long(audio, 60 * minutes)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(audio), str(checkpoint), str(tmp_path / "e.tsv")],
                              capture_output=True, text=True, env=env, timeout=300)
        audio.unlink()
        code, kib = proc.stdout.split()[-2:]
        assert code == "0", proc.stderr
        peaks[minutes] = int(kib) / 1024
    assert peaks[4] - peaks[0.5] < 30, f"peak RSS grew with the file: {peaks} MiB"
