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
