"""Writing procedurally made DCASE-format splits for tests (no shared data set needed)."""

from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

Scene = Callable[[np.random.Generator, float], tuple[np.ndarray, list[tuple[float, float, str]]]]


def write_dcase_split(folder: Path, n_files: int, seconds: float, rng: np.random.Generator,
                      make_scene: Scene, rate: int) -> tuple[Path, Path]:
    """<folder>/audio/*.wav and <folder>/annotations.tsv (DCASE format) from make_scene(rng, seconds),
    which returns (samples, [(onset_s, offset_s, label), ...])."""
    audio = folder / "audio"
    audio.mkdir(parents=True)
    rows = ["filename\tonset\toffset\tevent_label"]
    for i in range(n_files):
        x, events = make_scene(rng, seconds)
        name = f"{folder.name}_{i}.wav"
        sf.write(audio / name, x, rate)
        rows += [f"{name}\t{on}\t{off}\t{label}" for on, off, label in events]
    tsv = folder / "annotations.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    return audio, tsv


# ------------------------------------------------------------------------------ clip pools
def tone(rate: int, seconds: float, freq: float, amp: float = 0.5, lead_s: float = 0.0, tail_s: float = 0.0) -> np.ndarray:
    """Silence, a tone with 5 ms fades, silence: only the tone is audible."""
    t = np.arange(round(seconds * rate)) / rate
    x = amp * np.sin(2 * np.pi * freq * t) * np.minimum(1.0, np.minimum(t, t[::-1]) / 0.005)
    return np.concatenate([np.zeros(round(lead_s * rate)), x, np.zeros(round(tail_s * rate))])


def write_event_pool(root: Path, rate: int = 16000, classes: tuple[str, ...] = ("beep", "hiss"),
                     per_fold: int = 2, folds: tuple[int, ...] = (1, 2, 3, 4), seed: int = 0) -> Path:
    """An ESC-like pool (meta.csv: filename, class, fold, source_clip_id, clip_license): "beep" is
    a 0.4-0.8 s tone between silences, "hiss" a 0.3-0.6 s noise burst, "knock" a few clicks."""
    rng = np.random.default_rng(seed)
    rows, sound_id = ["filename,class,fold,source_clip_id,clip_license"], 100
    for label in classes:
        for fold in folds:
            for _ in range(per_fold):
                sound_id += 1
                if label == "beep":
                    x = tone(rate, rng.uniform(0.4, 0.8), rng.uniform(500, 1500), lead_s=0.2, tail_s=0.3)
                elif label == "hiss":
                    x = np.concatenate([np.zeros(rate // 10), 0.2 * rng.standard_normal(round(rng.uniform(0.3, 0.6) * rate)),
                                        np.zeros(rate // 5)])
                else:
                    x = np.zeros(rate)
                    x[:: rate // 5] = 0.8
                    x = np.convolve(x, np.hanning(64))[:rate]
                name = f"audio/{label}/{fold}-{sound_id}-A.wav"
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                sf.write(root / name, x.astype(np.float32), rate, subtype="FLOAT")
                rows.append(f"{name},{label},{fold},{fold}-{sound_id}-A,CC0")
    (root / "meta.csv").write_text("\n".join(rows) + "\n")
    return root


def write_world_pool(root: Path, rate: int = 16000, seed: int = 0,
                     groups: dict[str, tuple[str, ...]] | None = None, files_per_group: int = 3) -> Path:
    """A world pool in ../shared/tools/negatives' layout (meta.csv: filename, category, split,
    source, group, duration_s, license, attribution). "Speech": syllables of a harmonic tone with
    pauses; "music": sustained chords; "ambience": band-limited noise."""
    groups = groups or {"speech": ("spk_a", "spk_b", "spk_c"), "music": ("album_a", "album_b"),
                        "ambience": ("street", "kitchen")}
    rng = np.random.default_rng(seed)
    rows = ["filename,category,split,source,group,duration_s,license,attribution"]
    for category, names in groups.items():
        for group in names:
            for k in range(files_per_group):
                if category == "speech":
                    f0 = rng.uniform(100, 250)
                    parts = []
                    for _ in range(int(rng.integers(2, 5))):
                        seconds = rng.uniform(0.15, 0.3)
                        syl = sum(tone(rate, seconds, f0 * h, 0.3 / h) for h in (1, 2, 3))
                        parts += [syl, np.zeros(round(rng.uniform(0.05, 0.2) * rate))]
                    x = np.concatenate([np.zeros(rate // 10)] + parts)
                elif category == "music":
                    x = sum(tone(rate, 4.0, f, 0.15) for f in rng.choice([262.0, 330.0, 392.0, 440.0, 523.0], 3))
                else:
                    x = np.convolve(rng.standard_normal(3 * rate), np.hanning(16) / 8, "same") * 0.1
                name = f"{category}/train/src_{group}/{group}__{k}.flac"
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                sf.write(root / name, np.clip(x, -1, 1).astype(np.float32), rate, subtype="PCM_16", format="FLAC")
                rows.append(f"{name},{category},train,src_{group},{group},{len(x) / rate:.3f},CC0,test audio")
    (root / "meta.csv").write_text("\n".join(rows) + "\n")
    return root


# ------------------------------------------------------------------------------ scenes
def sound_scene(rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    """(N,) float32 mono at `rate`: a scene of man-made sounds over a pink-noise bed, for tests that
    need a detector to respond with the whole range of probabilities (not only near 0): tones and
    harmonic "syllables", chirps, noise bursts (white and low-passed, like rain or an engine), click
    trains (like a clock), each 0.3-3 s long, a few overlapping, at levels from -40 to -6 dBFS."""
    rng = np.random.default_rng(seed)
    n = round(seconds * rate)
    white = rng.standard_normal(n)
    spectrum = np.fft.rfft(white) / np.sqrt(np.maximum(np.arange(n // 2 + 1), 1))  # 1/f power: pink
    x = 0.01 * np.fft.irfft(spectrum, n) / np.std(np.fft.irfft(spectrum, n))
    start = 0.0
    while start < seconds - 0.5:
        length = min(rng.uniform(0.3, 3.0), seconds - start)
        m = round(length * rate)
        t = np.arange(m) / rate
        kind = rng.integers(5)
        if kind == 0:
            s = tone(rate, length, rng.uniform(200, 3000))[:m]
        elif kind == 1:
            f0 = rng.uniform(90, 300)
            s = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
        elif kind == 2:
            f_lo, f_hi = rng.uniform(200, 1000), rng.uniform(1500, 6000)
            s = np.sin(2 * np.pi * (f_lo * t + (f_hi - f_lo) * t * t / (2 * length)))
        elif kind == 3:
            s = rng.standard_normal(m)
            if rng.random() < 0.5:
                s = np.convolve(s, np.hanning(32) / 16, "same")
        else:
            s = np.zeros(m)
            s[:: round(rate * rng.uniform(0.1, 0.5))] = 1.0
            s = np.convolve(s, np.hanning(48), "same")
        s = s * np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms fades
        level = 10 ** (rng.uniform(-40, -6) / 20)
        i = round(start * rate)
        x[i:i + m] += level * s / max(np.abs(s).max(), 1e-9)
        start += length * rng.uniform(0.5, 1.5)  # overlap some, leave gaps after others
    return np.clip(x, -1, 1).astype(np.float32)
