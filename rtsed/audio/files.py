"""Reading audio files into the model's sample rate: decode, downmix, resample, block by block.

Every source ends up as mono float32 at the front end's rate (docs/conventions.md: sources are resampled
to the model's rate, never the other way round). Files are read with soundfile (WAV, FLAC, OGG,
any PCM width) in blocks and resampled with soxr's streaming resampler (VHQ), so memory stays
bounded however long the file: ``AudioFileReader`` yields the blocks, ``read_audio`` joins them
(the joined blocks equal ``soxr.resample`` of the whole file, bitwise).

While reading, ``AudioFileReader.notes`` collects what a user should hear about the file (cut
short, recorded below the model's rate, clipped) as one-line warnings; a file that cannot be used
at all (missing, undecodable, empty, NaN/Inf samples, a decoding error partway) raises
AudioFileError naming the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr

# |x| at or above this after conversion to float counts as clipped: int16 full scale is
# 32767/32768 = 1 - 2**-15, so a clipped 16-bit input reaches it; wider formats clip at the same level.
CLIP_LEVEL = 1.0 - 2.0**-15
# Clipped values (all channels) above this fraction of the file earn a warning: a handful of
# full-scale peaks is common in loud recordings, a thousandth of the file is audible distortion.
CLIP_WARN_FRACTION = 1e-3
# Samples per channel decoded at a time: 1 s at 64 kHz, 0.5 MB of stereo float32.
READ_BLOCK_FRAMES = 65536

# The suffixes of the audio files a folder is searched for (rtsed.detect, train.teach, false alarms).
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".aifc", ".au", ".mp3", ".opus"})


def audio_files_under(folder: Path) -> list[Path]:
    """Every audio file (AUDIO_SUFFIXES, any case) under ``folder``, recursively, sorted; [] when none."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


class AudioFileError(ValueError):
    """An audio file that cannot be used; the message names the file and the fix."""


def open_sound_file(path: str | Path) -> sf.SoundFile:
    """The file opened with soundfile, or AudioFileError: "not found" for a missing path, "cannot
    decode" for a file soundfile cannot read, "holds no samples" for an empty one."""
    path = Path(path)
    if not path.exists():
        raise AudioFileError(f"{path}: not found; check the path (relative paths start at {Path.cwd()})")
    if path.is_dir():
        raise AudioFileError(f"{path}: is a folder, not an audio file")
    try:
        f = sf.SoundFile(str(path))
    except Exception as exc:  # soundfile raises LibsndfileError/RuntimeError/OSError by version
        raise AudioFileError(
            f"{path}: cannot decode audio ({exc}); use WAV/FLAC/OGG that soundfile reads, "
            "or convert it (e.g. ffmpeg -i in.mp3 out.wav)"
        ) from None
    if f.frames == 0:
        f.close()
        raise AudioFileError(f"{path}: the file holds no samples")
    return f


def declared_wav_frames(path: Path) -> int | None:
    """Sample frames a RIFF/WAVE header promises (its data chunk's size / block align), or None
    when the file is not such a WAV or the size is a streaming writer's placeholder (0 or
    0xFFFFFFFF). libsndfile quietly shortens a cut WAV to what is there, so the header is the
    only record of what a truncated file should have held."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return None
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block_align = 12, None
    while pos + 8 <= len(head):
        chunk, size = head[pos:pos + 4], struct.unpack("<I", head[pos + 4:pos + 8])[0]
        if chunk == b"fmt " and pos + 22 <= len(head):
            block_align = struct.unpack("<H", head[pos + 20:pos + 22])[0]
        if chunk == b"data":
            if not block_align or size in (0, 0xFFFFFFFF):
                return None
            return size // block_align
        pos += 8 + size + (size & 1)
    return None


@dataclass
class AudioFileNotes:
    """What reading a file found. ``frames_*`` count sample frames at the file's rate;
    ``declared_frames`` is what the header promises (None when it does not say);
    ``clipped_values`` counts values over all channels at |x| >= CLIP_LEVEL."""

    path: Path
    file_rate_hz: int
    channels: int
    declared_frames: int | None
    frames_read: int = 0
    clipped_values: int = 0

    @property
    def truncated(self) -> bool:
        return self.declared_frames is not None and self.frames_read < self.declared_frames

    def warnings(self, model_rate_hz: int) -> list[str]:
        """One line per problem that makes detections less trustworthy, each naming the fix."""
        out = []
        rate = self.file_rate_hz
        if self.truncated:
            out.append(f"{self.path}: truncated: the header promises {self.declared_frames / rate:.2f} s, the file "
                       f"holds {self.frames_read / rate:.2f} s (a copy or recording cut short?); detected over "
                       "what is there: re-copy the file if the rest matters")
        if rate < model_rate_hz:
            out.append(f"{self.path}: recorded at {rate} Hz, below the model's {model_rate_hz} Hz: nothing above "
                       f"{rate / 2000:g} kHz is there for the model to hear, so detections may be missed or wrong; "
                       f"use a recording at {model_rate_hz} Hz or more")
        values = self.frames_read * self.channels
        if values and self.clipped_values > CLIP_WARN_FRACTION * values:
            out.append(f"{self.path}: clipped: {self.clipped_values} samples ({100 * self.clipped_values / values:.2f} %) "
                       "at full scale; distorted sound may be misdetected: record at a lower gain")
        return out


class AudioFileReader:
    """A file as mono float32 blocks (m,) at ``sample_rate_hz``, read and resampled block by block.

    Several channels are averaged (downmix, float32 like ``numpy.mean``). Iterating yields the
    blocks (some may be empty while soxr fills its internal block), the resampler's tail last.
    Raises AudioFileError naming the file: at construction for a missing, undecodable or empty
    file; while iterating for NaN/Inf samples or a decoding error partway. ``notes`` fills in as
    blocks are read. Use as a context manager (closes the file).
    """

    def __init__(self, path: str | Path, sample_rate_hz: int, block_frames: int = READ_BLOCK_FRAMES):
        self.path = Path(path)
        self.sample_rate_hz = int(sample_rate_hz)
        self.block_frames = int(block_frames)
        self._file = open_sound_file(self.path)
        self.notes = AudioFileNotes(self.path, int(self._file.samplerate), int(self._file.channels),
                                    self._declared_frames())

    def _declared_frames(self) -> int | None:
        if self._file.format == "WAV":
            return declared_wav_frames(self.path)
        if self._file.format == "FLAC":  # STREAMINFO's exact sample count
            return int(self._file.frames)
        return None  # other formats' counts may be estimates (VBR): no claim to check against

    def __enter__(self) -> "AudioFileReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        rate = self.notes.file_rate_hz
        resampler = None
        if rate != self.sample_rate_hz:
            resampler = soxr.ResampleStream(rate, self.sample_rate_hz, 1, dtype="float32", quality="VHQ")
        notes = self.notes
        while True:
            try:
                data = self._file.read(self.block_frames, dtype="float32", always_2d=True)
            except Exception as exc:
                raise AudioFileError(f"{self.path}: decoding failed at {notes.frames_read / rate:.2f} s ({exc}); "
                                     "the file is corrupt: re-copy or re-encode it") from None
            if data.shape[0] == 0:
                break
            finite = np.isfinite(data)
            if not finite.all():
                bad = notes.frames_read + int(np.argwhere(~finite)[0, 0])
                raise AudioFileError(f"{self.path}: non-finite sample (NaN/Inf) at sample {bad}; the file is corrupt")
            notes.clipped_values += int(np.count_nonzero(np.abs(data) >= CLIP_LEVEL))
            notes.frames_read += data.shape[0]
            mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
            mono = np.ascontiguousarray(mono, dtype=np.float32)
            yield mono if resampler is None else resampler.resample_chunk(mono, last=False)
        if notes.frames_read == 0:
            raise AudioFileError(f"{self.path}: the file holds no samples")
        if resampler is not None:
            yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)


def read_audio(path: str | Path, sample_rate_hz: int) -> np.ndarray:
    """The file as mono float32 samples (N,) at sample_rate_hz, in [-1, 1] for PCM files.

    Several channels are averaged (downmix). Raises AudioFileError for missing, unreadable, empty
    or non-finite audio, naming the file. The whole signal is in memory: for long files iterate
    an ``AudioFileReader`` instead.
    """
    with AudioFileReader(path, sample_rate_hz) as reader:
        blocks = list(reader)
    return np.ascontiguousarray(np.concatenate(blocks), dtype=np.float32)
