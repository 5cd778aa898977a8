"""rtsed.audio.files: files read block by block equal the whole file resampled at once; what is
wrong with a file (missing, corrupt, NaN, cut short, recorded below the model's rate, clipped) is
found and named."""

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from rtsed.audio.files import AudioFileError, AudioFileReader, declared_wav_frames, read_audio


RATE = 16000


def _noise(seconds: float, rate: int, channels: int, seed: int = 0, amp: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (amp * rng.standard_normal((round(seconds * rate), channels))).astype(np.float32)


@pytest.mark.parametrize("rate,channels", [(8000, 1), (22050, 2), (44100, 2), (48000, 1), (RATE, 2)])
def test_blocks_equal_the_whole_file_resampled_at_once(tmp_path, rate, channels):
    """The streamed blocks, joined, are bitwise the old whole-file read: sf.read -> mean -> soxr.resample."""
    x = _noise(2.3, rate, channels)[:-7]  # an odd length
    path = tmp_path / "x.wav"
    sf.write(path, x, rate, subtype="FLOAT")
    data, _ = sf.read(path, dtype="float32", always_2d=True)
    mono = data.mean(axis=1) if channels > 1 else data[:, 0]
    expected = mono if rate == RATE else soxr.resample(mono, rate, RATE, quality="VHQ")
    with AudioFileReader(path, RATE, block_frames=4099) as reader:
        blocks = list(reader)
    assert len(blocks) > 2
    np.testing.assert_array_equal(np.concatenate(blocks), expected)
    np.testing.assert_array_equal(read_audio(path, RATE), expected)


def test_missing_file_is_not_found_not_a_decode_error(tmp_path):
    with pytest.raises(AudioFileError, match="missing.wav: not found") as exc:
        read_audio(tmp_path / "missing.wav", RATE)
    assert "decode" not in str(exc.value)
    with pytest.raises(AudioFileError, match="is a folder"):
        read_audio(tmp_path, RATE)


def test_corrupt_files_raise_naming_the_file_and_where(tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    with pytest.raises(AudioFileError, match="junk.wav: cannot decode audio"):
        read_audio(junk, RATE)
    nan = tmp_path / "nan.wav"
    x = _noise(1.0, RATE, 1)
    x[12345, 0] = np.nan
    sf.write(nan, x, RATE, subtype="FLOAT")
    with pytest.raises(AudioFileError, match="nan.wav: non-finite sample .* at sample 12345"):
        read_audio(nan, RATE)
    # A FLAC whose middle was overwritten: the header parses, decoding fails partway.
    flac = tmp_path / "scrambled.flac"
    sf.write(flac, _noise(6.0, RATE, 1)[:, 0], RATE)
    data = bytearray(flac.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4000] = np.random.default_rng(1).integers(0, 256, 4000, np.uint8).tobytes()
    flac.write_bytes(bytes(data))
    with pytest.raises(AudioFileError, match=r"scrambled.flac: decoding failed at \d+\.\d\d s .*corrupt"):
        read_audio(flac, RATE)


def test_truncated_wav_is_read_to_its_end_and_noted(tmp_path):
    path = tmp_path / "cut.wav"
    sf.write(path, _noise(2.0, RATE, 2), RATE, subtype="PCM_16")
    whole = path.read_bytes()
    assert declared_wav_frames(path) == 2 * RATE
    path.write_bytes(whole[:44 + 4 * RATE // 2])  # header + 0.5 s of 16-bit stereo
    with AudioFileReader(path, RATE) as reader:
        samples = np.concatenate(list(reader))
    assert samples.shape == (RATE // 2,)
    assert reader.notes.truncated
    (line,) = reader.notes.warnings(RATE)
    assert "cut.wav: truncated" in line and "2.00 s" in line and "0.50 s" in line
    intact = tmp_path / "intact.wav"
    intact.write_bytes(whole)
    with AudioFileReader(intact, RATE) as reader:
        list(reader)
    assert not reader.notes.truncated and reader.notes.warnings(RATE) == []


def test_low_rate_and_clipping_are_noted(tmp_path):
    low = tmp_path / "phone.wav"
    sf.write(low, _noise(1.0, 8000, 1, amp=0.1), 8000)
    with AudioFileReader(low, RATE) as reader:
        list(reader)
    (line,) = reader.notes.warnings(RATE)
    assert "phone.wav: recorded at 8000 Hz, below the model's 16000 Hz" in line
    loud = tmp_path / "loud.wav"
    sf.write(loud, np.clip(_noise(1.0, RATE, 1, amp=2.0), -1, 1), RATE, subtype="PCM_16")
    with AudioFileReader(loud, RATE) as reader:
        list(reader)
    (line,) = reader.notes.warnings(RATE)
    assert "loud.wav: clipped" in line and "lower gain" in line
    quiet = tmp_path / "quiet.wav"
    x = _noise(1.0, RATE, 1, amp=0.1)
    x[::4000] = 1.0  # four full-scale peaks: not worth a warning
    sf.write(quiet, x, RATE, subtype="PCM_16")
    with AudioFileReader(quiet, RATE) as reader:
        list(reader)
    assert reader.notes.clipped_values == 4 and reader.notes.warnings(RATE) == []


def test_live_input_file_missing_is_not_found(checkpoint, tmp_path, capsys):
    """rtsed.live --input with a path that does not exist: "not found", exit 2, no traceback."""
    from rtsed.audio.sources import FileSource
    from rtsed.cli.live import main as live_main

    with pytest.raises(AudioFileError, match="missing.flac: not found"):
        FileSource(tmp_path / "missing.flac", RATE)
    threads = torch.get_num_threads()
    try:
        code = live_main(["--model", str(checkpoint), "--input", str(tmp_path / "missing.wav"), "--no-view"])
    finally:
        torch.set_num_threads(threads)  # rtsed.live streams on one thread; later tests expect the default
    err = capsys.readouterr().err
    assert code == 2 and "missing.wav: not found" in err and "decode" not in err and "Traceback" not in err
