"""Data-set descriptions: a tiny fake TUT-SED Synthetic 2016 tree, DCASE folders, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rtsed.config import TUT_SED_2016_LABELS
from train.annotations import AnnotationError, Event
from train.datasets import DatasetError, DcaseDataset, SynthScenes, TutSed2016

RATE = 44100


def _tone(seconds: float = 0.5, rate: int = RATE, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return 0.3 * np.sin(2 * np.pi * freq * t)


def _tut_tree(root: Path, n: int = 10, setup: dict[str, list[int]] | None = None) -> Path:
    """A TUT-SED Synthetic 2016 folder with n half-second mixtures (ids 1..n) and split lists."""
    base = root / "TUT-SED-synthetic-2016"
    for sub in ("audio", "meta", "evaluation_setup"):
        (base / sub).mkdir(parents=True)
    for i in range(1, n + 1):
        subtype = "PCM_24" if i == 1 else "PCM_16"  # "any PCM width"
        sf.write(base / f"audio/TUT-SED-synthetic-2016-mix-{i}.wav", _tone(freq=200 + 50 * i), RATE, subtype=subtype)
        label = TUT_SED_2016_LABELS[i % 16]
        (base / f"meta/TUT-SED-synthetic-2016-annot-{i}.txt").write_text(f"0.1\t0.3\t{label}\n0.0 0.05 rain\n")
    for name, ids in (setup or {}).items():
        lines = [f"audio/TUT-SED-synthetic-2016-mix-{i}.wav\t0.1\t0.3\tbus" for i in ids]
        (base / "evaluation_setup" / name).write_text("\n".join(lines) + "\n")
    return base


DCASE_UTIL_SETUP = {"train+validate.txt": list(range(3, 11)), "validate.txt": [3, 4],
                    "test.txt": [1, 2], "evaluate.txt": [1, 2]}


def test_tut_dcase_util_style_lists(tmp_path):
    _tut_tree(tmp_path, setup=DCASE_UTIL_SETUP)
    ds = TutSed2016(tmp_path)  # the parent of TUT-SED-synthetic-2016/ works too
    assert ds.labels == TUT_SED_2016_LABELS
    assert ds.splits == ("train", "validate", "test")
    assert [p.name for p, _ in ds.pairs("test")] == [f"TUT-SED-synthetic-2016-mix-{i}.wav" for i in (1, 2)]
    assert len(ds.split("validate")) == 2 and len(ds.split("train")) == 6
    path, events, split = next(iter(ds))
    assert split == "test" and path.name.endswith("mix-1.wav")
    assert events == (Event(path.name, 0.0, 0.05, "rain"), Event(path.name, 0.1, 0.3, TUT_SED_2016_LABELS[1]))
    item = ds.split("test")[0]
    assert item.sample_rate_hz == RATE and item.duration_s == pytest.approx(0.5)
    assert "train: 6 files" in ds.summary()


def test_tut_fold_style_lists_and_root_itself(tmp_path):
    base = _tut_tree(tmp_path, setup={"fold1_train.txt": list(range(1, 7)), "fold1_validate.txt": [7, 8],
                                      "fold1_evaluate.txt": [9, 10], "README.txt": []})
    ds = TutSed2016(base)
    assert sorted(int(p.stem.rsplit("-", 1)[1]) for p, _ in ds.pairs("test")) == [9, 10]


def test_tut_several_folds_need_a_choice(tmp_path):
    setup = {}
    for f in (1, 2):
        setup |= {f"fold{f}_train.txt": list(range(1, 7)), f"fold{f}_validate.txt": [7, 8],
                  f"fold{f}_test.txt": [9, 10]}
    _tut_tree(tmp_path, setup=setup)
    with pytest.raises(DatasetError, match=r"several sets of split lists \['fold1', 'fold2'\]"):
        TutSed2016(tmp_path)
    assert len(TutSed2016(tmp_path, setup="fold2").split("train")) == 6


def test_tut_without_lists_fails_listing_files_unless_fallback(tmp_path):
    _tut_tree(tmp_path, setup={"notes.txt": [1]})
    with pytest.raises(DatasetError, match=r"no usable split lists .* files found: \['notes.txt'\]"):
        TutSed2016(tmp_path)
    ds = TutSed2016(tmp_path, fallback_split=True)
    ids = {s: sorted(int(p.stem.rsplit("-", 1)[1]) for p, _ in ds.pairs(s)) for s in ds.splits}
    assert ids == {"test": [1, 2], "validate": [3, 4], "train": [5, 6, 7, 8, 9, 10]}


def test_tut_wrong_layout_lists_what_is_there(tmp_path):
    (tmp_path / "wavs").mkdir()
    with pytest.raises(DatasetError, match=r"not a TUT-SED Synthetic 2016 folder.*found \['wavs/'\]"):
        TutSed2016(tmp_path)


@pytest.mark.parametrize(
    "setup, message",
    [
        ({"train.txt": [1, 2, 3, 4, 5, 6], "validate.txt": [7, 8], "test.txt": [9]},
         r"mixtures in no split list: \['10'\]"),
        ({"train.txt": [1, 2, 3, 4, 5, 6, 7], "validate.txt": [7, 8], "test.txt": [9, 10]},
         r"mixtures in both train and validate: \['7'\]"),
        ({"train.txt": list(range(1, 9)), "validate.txt": [], "test.txt": [9, 10, 11]},
         r"listed mixtures without audio: \['11'\]"),
        ({"train.txt": list(range(1, 7)), "validate.txt": [7, 8], "test.txt": [9, 10], "evaluate.txt": [9]},
         r"test lists .* name different mixtures"),
    ],
)
def test_tut_inconsistent_lists(tmp_path, setup, message):
    _tut_tree(tmp_path, setup=setup)
    with pytest.raises(DatasetError, match=message):
        TutSed2016(tmp_path)


def test_tut_empty_split_is_an_error(tmp_path):
    _tut_tree(tmp_path, n=4, setup={"train.txt": [1, 2, 3, 4], "validate.txt": [], "test.txt": []})
    with pytest.raises(DatasetError, match="split 'validate' is empty"):
        TutSed2016(tmp_path)


def test_tut_bad_files_are_named(tmp_path):
    base = _tut_tree(tmp_path, setup=DCASE_UTIL_SETUP)
    sf.write(base / "audio/TUT-SED-synthetic-2016-mix-3.wav", np.zeros(RATE // 2), RATE)
    (base / "audio/TUT-SED-synthetic-2016-mix-4.wav").write_bytes(b"RIFF not really a wav")
    (base / "meta/TUT-SED-synthetic-2016-annot-5.txt").write_text("0.1 0.2 tiger\n")
    (base / "meta/TUT-SED-synthetic-2016-annot-6.txt").write_text("3.0 3.2 bus\n")
    sf.write(base / "audio/TUT-SED-synthetic-2016-mix-7.wav", _tone(rate=22050), 22050)
    with pytest.raises(DatasetError) as info:
        TutSed2016(tmp_path)
    text = str(info.value)
    assert "5 problem(s)" in text
    assert "mix-3.wav: audio is silent" in text
    assert "mix-4.wav: cannot read audio" in text
    assert "annot-5.txt, line 1: unknown label 'tiger'" in text
    assert "annot-6.txt, line 1: onset 3.0 s of 'bus' lies beyond the end" in text
    assert "mix-7.wav: sample rate 22050 Hz, expected 44100 Hz" in text


def test_tut_missing_annotation_or_audio(tmp_path):
    base = _tut_tree(tmp_path, setup=DCASE_UTIL_SETUP)
    (base / "meta/TUT-SED-synthetic-2016-annot-2.txt").unlink()
    (base / "audio/TUT-SED-synthetic-2016-mix-5.wav").unlink()
    with pytest.raises(DatasetError, match=r"(?s)mix-2.wav: no annotation file.*annot-5.txt: no audio file"):
        TutSed2016(tmp_path)


# ------------------------------------------------------------------------------------------- DCASE
def _dcase_folder(root: Path, tsv: str, files=("a.wav", "b.wav", "sub/c.flac")) -> tuple[Path, Path]:
    audio = root / "audio"
    for name in files:
        (audio / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(audio / name, _tone(1.0, 16000), 16000)
    (root / "ann.tsv").write_text("filename\tonset\toffset\tevent_label\n" + tsv)
    return audio, root / "ann.tsv"


GOOD_TSV = "a.wav\t0.1\t0.5\tdog\nsub/c.flac\t0.2\t0.9\tbird\nb.wav\t\t\t\na.wav\t0.3\t0.4\tbird\n"


def test_dcase_folder(tmp_path):
    ds = DcaseDataset(*_dcase_folder(tmp_path, GOOD_TSV), split="validate")
    assert ds.labels == ("bird", "dog")  # sorted, from the data
    pairs = dict((p.relative_to(tmp_path / "audio").as_posix(), ev) for p, ev in ds.pairs("validate"))
    assert pairs["b.wav"] == ()  # listed with an empty row: all-negative
    assert [e.event_label for e in pairs["a.wav"]] == ["dog", "bird"]  # sorted by onset
    assert ds.splits == ("validate",)
    with pytest.raises(DatasetError, match=r"split 'train' is empty; splits present: \['validate'\]"):
        ds.split("train")
    given = DcaseDataset(*_dcase_folder(tmp_path / "x", GOOD_TSV), labels=["dog", "bird", "cat"])
    assert given.labels == ("dog", "bird", "cat")


def test_dcase_unlisted_files(tmp_path):
    tsv = "a.wav\t0.1\t0.5\tdog\n"
    audio, ann = _dcase_folder(tmp_path, tsv)
    with pytest.raises(DatasetError, match=r"(?s)b\.wav: not in .*ann\.tsv.*sub/c\.flac: not in"):
        DcaseDataset(audio, ann)
    negative = DcaseDataset(audio, ann, unlisted="negative")
    assert sorted(len(ev) for _, ev in negative.pairs("train")) == [0, 0, 1]
    skipped = DcaseDataset(audio, ann, unlisted="skip")
    assert len(skipped) == 1 and skipped.skipped == 2


@pytest.mark.parametrize(
    "tsv, error, message",
    [
        ("a.wav\t0.1\t0.5\tdog\nmissing.wav\t0.1\t0.2\tdog\n", DatasetError,
         r"missing\.wav: annotated in .* but missing"),
        ("a.wav\t1.5\t1.7\tdog\n", DatasetError, r"event 1 of 'a\.wav' \(dog, 1\.5-1\.7 s\) lies outside the file"),
        ("a.wav\t0.1\t0.5\tcat\n", AnnotationError,
         r"ann\.tsv, line 2: unknown label 'cat'; known labels are \['bird', 'dog'\]"),
        ("", DatasetError, r"no files listed"),
    ],
)
def test_dcase_bad_inputs(tmp_path, tsv, error, message):
    audio, ann = _dcase_folder(tmp_path, tsv, files=("a.wav",))
    with pytest.raises(error, match=message):
        DcaseDataset(audio, ann, labels=["dog", "bird"])


def test_dcase_silent_file_named(tmp_path):
    audio, ann = _dcase_folder(tmp_path, "a.wav\t0.1\t0.5\tdog\n", files=("a.wav",))
    sf.write(audio / "a.wav", np.zeros(16000), 16000, subtype="PCM_16")
    with pytest.raises(DatasetError, match=r"a\.wav: audio is silent"):
        DcaseDataset(audio, ann)
    assert len(DcaseDataset(audio, ann, check_silence=False)) == 1


def test_synth_scenes_tree(tmp_path):
    for split in ("train", "test"):
        _dcase_folder(tmp_path / split, "a.wav\t0.1\t0.5\tdog\n", files=("a.wav",))
        (tmp_path / split / "ann.tsv").rename(tmp_path / split / "annotations.tsv")
    (tmp_path / "manifest.json").write_text('{"labels": ["dog", "rain"]}')
    ds = SynthScenes(tmp_path)
    assert ds.splits == ("train", "test") and ds.labels == ("dog", "rain")
    with pytest.raises(DatasetError, match="no <split>/annotations.tsv"):
        SynthScenes(tmp_path / "train")
