"""Reading audio files into the model's sample rate: decode, downmix, resample.

Every source ends up as mono float32 at the front end's rate (docs/conventions.md: sources are resampled
to the model's rate, never the other way round). Files are read with soundfile (WAV, FLAC, OGG,
any PCM width) and resampled with soxr (VHQ).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioFileError(ValueError):
    """An audio file that cannot be used; the message names the file and the fix."""


def read_audio(path: str | Path, sample_rate_hz: int) -> np.ndarray:
    """The file as mono float32 samples (N,) at sample_rate_hz, in [-1, 1] for PCM files.

    Several channels are averaged (downmix). Raises AudioFileError for unreadable, empty or
    non-finite audio, naming the file.
    """
    path = Path(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError/RuntimeError/OSError by version
        raise AudioFileError(
            f"{path}: cannot decode audio ({exc}); use WAV/FLAC/OGG that soundfile reads, "
            "or convert it (e.g. ffmpeg -i in.mp3 out.wav)"
        ) from None
    if data.shape[0] == 0:
        raise AudioFileError(f"{path}: the file holds no samples")
    if not np.isfinite(data).all():
        bad = int(np.argwhere(~np.isfinite(data))[0, 0])
        raise AudioFileError(f"{path}: non-finite sample (NaN/Inf) at sample {bad}; the file is corrupt")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != sample_rate_hz:
        mono = soxr.resample(mono, rate, sample_rate_hz, quality="VHQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(mono, dtype=np.float32)
