"""Scene synthesis from procedurally made clip pools (one test also uses the shared ESC-10 data: the
shared_data fixture in conftest.py finds it from RTSED_SHARED_DATA or ../shared/data)."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from train.annotations import read_dcase_tsv, read_dcase_tsv_by_file
from train.datasets import SynthScenes
from train.synth import SynthConfig, SynthError, audible_segments, load_pool, main, synthesize

POOL_RATE = 22050  # the scenes run at 8 kHz: every clip goes through soxr
SCENE_RATE = 8000
LICENSES = ("CC0", "CC-BY", "CC-BY-NC")


def _beep(rng, lead_s=0.2, tone_s=0.3, tail_s=0.5):
    """Silence, a tone, then a silent tail: only the tone may be labelled."""
    t = np.arange(round(tone_s * POOL_RATE)) / POOL_RATE
    tone = 0.5 * np.sin(2 * np.pi * rng.uniform(300, 900) * t) * np.minimum(1.0, np.minimum(t, t[::-1]) / 0.005)
    return np.concatenate([np.zeros(round(lead_s * POOL_RATE)), tone, np.zeros(round(tail_s * POOL_RATE))])


def _burst(rng):
    return np.concatenate([0.3 * rng.standard_normal(round(0.4 * POOL_RATE)), np.zeros(POOL_RATE // 10)])


def _clicks(rng):
    x = np.zeros(round(0.6 * POOL_RATE))
    x[:: POOL_RATE // 10] = 0.9
    return np.convolve(x, np.hanning(64))[: len(x)]


MAKERS = {"beep": _beep, "burst": _burst, "click": _clicks}


def _pool(root: Path, classes=("beep", "burst", "click"), per_fold=2, folds=(1, 2, 3, 4)) -> Path:
    """A meta.csv pool: per class and fold, `per_fold` clips; clips of one recording share a fold."""
    rng = np.random.default_rng(0)
    rows, sound_id = [], 1000
    for label in classes:
        for fold in folds:
            for k in range(per_fold):
                sound_id += 1
                name = f"audio/{label}/{fold}-{sound_id}-A.wav"
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                sf.write(root / name, MAKERS[label](rng), POOL_RATE)
                rows.append({"filename": name, "class": label, "fold": fold, "source_clip_id": f"{fold}-{sound_id}-A",
                             "clip_license": LICENSES[sound_id % 3], "freesound_author": f"author{sound_id}",
                             "freesound_url": f"http://www.freesound.org/people/x/sounds/{sound_id}/"})
    with open(root / "meta.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def _distractor_pool(root: Path) -> Path:
    """One sub-folder per category, ESC-style names (fold 4), no meta.csv."""
    rng = np.random.default_rng(1)
    for i, category in enumerate(("d_alpha", "d_beta", "d_gamma", "d_delta")):
        (root / category).mkdir(parents=True)
        for k in range(2):
            sf.write(root / category / f"4-{500 + 10 * i + k}-A.wav", _burst(rng), POOL_RATE)
    return root


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("pools")
    return _pool(root / "events"), _distractor_pool(root / "distractors")


def _config(pools, **kw) -> SynthConfig:
    base = dict(pool=str(pools[0]), distractors=str(pools[1]), scene_s=6.0, sample_rate_hz=SCENE_RATE,
                scenes=(2, 1, 1), events_per_minute=60.0, distractors_per_minute=20.0, noise="pink")
    return SynthConfig(**(base | kw))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_same_seed_same_bytes(pools, tmp_path, subtype):
    cfg = _config(pools, subtype=subtype, bed_classes=("click",))
    synthesize(cfg, tmp_path / "a")
    synthesize(cfg, tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 4 + 3 + 1 and a == b  # 4 scenes, 3 TSVs, manifest
    synthesize(dataclasses.replace(cfg, seed=1), tmp_path / "c")
    assert _files(tmp_path / "c")["train/audio/train_0000.wav"] != a["train/audio/train_0000.wav"]


def _max_polyphony(events) -> int:
    points = sorted([(e.onset_s, 1) for e in events] + [(e.offset_s, -1) for e in events], key=lambda p: (p[0], p[1]))
    level = best = 0
    for _, step in points:  # offsets sort before onsets at equal times: [a, b) intervals
        level += step
        best = max(best, level)
    return best


def test_polyphony_bound_from_tsv(pools, tmp_path):
    cfg = _config(pools, max_polyphony=2, events_per_minute=300.0, scenes=(3, 0, 0), distractors=None)
    manifest = synthesize(cfg, tmp_path)
    by_file = read_dcase_tsv_by_file(tmp_path / "train" / "annotations.tsv")
    assert len(by_file) == 3
    for events in by_file.values():
        assert _max_polyphony(events) == 2  # the bound holds and is reached
        for label in {e.event_label for e in events}:
            assert _max_polyphony([e for e in events if e.event_label == label]) == 1
    assert sum(s["dropped_events"] for s in manifest["splits"]["train"]["scenes"]) > 0
    assert not (tmp_path / "validate").exists()


def test_no_recording_in_two_splits(pools, tmp_path):
    manifest = synthesize(_config(pools, bed_classes=("click",)), tmp_path)
    recordings = {}
    for split, info in manifest["splits"].items():
        events = [c for c in info["clips"] if c["role"] != "distractor"]
        assert {c["fold"] for c in events} <= set(info["folds"])
        recordings[split] = {c["recording_id"] for c in events}
        assert {c["role"] for c in info["clips"]} == {"event", "bed", "distractor"}
    assert not recordings["train"] & recordings["validate"]
    assert not recordings["train"] & recordings["test"]
    assert not recordings["validate"] & recordings["test"]
    halves = manifest["distractor_categories"]
    assert halves == {"train": ["d_alpha", "d_beta"], "validate+test": ["d_delta", "d_gamma"]}
    for split, info in manifest["splits"].items():
        used = {c["class"] for c in info["clips"] if c["role"] == "distractor"}
        assert used <= set(halves["train" if split == "train" else "validate+test"])


def test_labels_follow_audible_extent_not_silent_tail(tmp_path):
    pool = _pool(tmp_path / "pool", classes=("beep",), per_fold=1)
    cfg = SynthConfig(pool=str(pool), scene_s=3.0, sample_rate_hz=SCENE_RATE, scenes=(1, 0, 0),
                      events_per_minute=20.0, event_db=(-20.0, -20.0))  # exactly one event
    synthesize(cfg, tmp_path / "out")
    [event] = read_dcase_tsv(tmp_path / "out" / "train" / "annotations.tsv")
    assert event.duration_s == pytest.approx(0.3, abs=0.021)  # the tone, not the 0.5 s tail
    x, rate = sf.read(tmp_path / "out" / "train" / "audio" / "train_0000.wav")
    on, off = round(event.onset_s * rate), round(event.offset_s * rate)
    assert np.abs(x[on:off]).max() > 0.05
    margin = round(0.01 * rate)  # the resampler's filter rings a few ms past each edge
    assert np.abs(x[: on - margin]).max() < 1e-3 and np.abs(x[off + margin:]).max() < 1e-3


def test_audible_segments_gaps():
    rate = 1000
    x = np.concatenate([np.zeros(100), np.ones(200), np.zeros(300), np.ones(100), np.zeros(500)])
    assert audible_segments(x, rate, 30.0, min_gap_s=1.0) == [(100, 700)]
    assert audible_segments(x, rate, 30.0, min_gap_s=0.2) == [(100, 300), (600, 700)]
    assert audible_segments(np.zeros(1000), rate, 30.0, 1.0) == []


def test_distractors_and_beds_are_unlabelled(pools, tmp_path):
    manifest = synthesize(_config(pools, bed_classes=("click",)), tmp_path)
    assert manifest["labels"] == ["beep", "burst"]
    for split in ("train", "validate", "test"):
        labels = {e.event_label for e in read_dcase_tsv(tmp_path / split / "annotations.tsv")}
        assert labels <= {"beep", "burst"}
        assert any(c["role"] == "distractor" for c in manifest["splits"][split]["clips"])


def test_licence_filter(pools, tmp_path):
    manifest = synthesize(_config(pools, licenses=("CC0", "cc-by"), distractors=None), tmp_path / "ok")
    clips = [c for s in manifest["splits"].values() for c in s["clips"]]
    assert clips and {c["license"] for c in clips} <= {"CC0", "CC-BY"}
    assert {a["license"] for a in manifest["attribution"]} <= {"CC0", "CC-BY"}
    no_class = r"split \w+ \(folds \[\d(, \d)?\]\): no clip of class '\w+' after the licence"
    with pytest.raises(SynthError, match=no_class):
        synthesize(_config(pools, licenses=("CC-BY-NC",), distractors=None), tmp_path / "nc")
    with pytest.raises(SynthError, match="no clip passes the licence filter"):
        synthesize(_config(pools, licenses=("CC-Sampling+",)), tmp_path / "none")


def test_bad_config_and_pool_errors(pools, tmp_path):
    with pytest.raises(SynthError, match="fold 3 is in both validate and test"):
        _config(pools, folds=((1, 2), (3,), (3, 4)))
    with pytest.raises(SynthError, match=r"unknown class\(es\) \['tiger'\]"):
        synthesize(_config(pools, classes=("tiger",)), tmp_path / "x")
    with pytest.raises(SynthError, match="no clips"):
        load_pool(tmp_path)
    synthesize(_config(pools, scenes=(1, 0, 0)), tmp_path / "y")
    with pytest.raises(SynthError, match="already holds 1 WAV files"):
        synthesize(_config(pools, scenes=(1, 0, 0)), tmp_path / "y")


def test_cli_runs_and_output_loads(pools, tmp_path, capsys):
    out = tmp_path / "scenes"
    args = ["--pool", str(pools[0]), "--out", str(out), "--scene-s", "4",
            "--sample-rate", str(SCENE_RATE), "--scenes", "1", "1", "1", "--noise", "white",
            "--licenses", "CC0,CC-BY", "--event-db-min", "-30", "--seed", "7"]
    done = subprocess.run([sys.executable, "-m", "train.synth", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train: 1 scenes" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 7 and manifest["config"]["licenses"] == ["CC0", "CC-BY"]
    ds = SynthScenes(out)
    assert ds.splits == ("train", "validate", "test") and ds.labels == ("beep", "burst", "click")
    assert ds.split("test")[0].sample_rate_hz == SCENE_RATE
    with pytest.raises(SystemExit) as exit_info:
        main(["--pool", str(tmp_path), "--out", str(out)])
    assert exit_info.value.code == 2 and "no clips" in capsys.readouterr().err


def test_real_clips_permitted_licences_only(tmp_path, shared_data):
    distractors = shared_data / "esc50-fold4"
    cfg = SynthConfig(pool=str(shared_data / "esc10"), distractors=str(distractors) if distractors.is_dir() else None,
                      scene_s=10.0, scenes=(1, 1, 1), licenses=("CC0", "CC-BY"), bed_classes=("rain",))
    manifest = synthesize(cfg, tmp_path)
    clips = [c for s in manifest["splits"].values() for c in s["clips"]]
    assert {c["license"] for c in clips} <= {"CC0", "CC-BY"}
    assert all(c["author"] and c["url"] for c in clips)
    for split, info in manifest["splits"].items():
        assert {c["fold"] for c in info["clips"] if c["role"] != "distractor"} <= set(info["folds"])
    ds = SynthScenes(tmp_path)
    assert "rain" not in ds.labels and len(ds.labels) == 9
    # The envelope rule agrees with the pool's own core extents (within 30 dB of the peak) for most clips.
    rows = list(csv.DictReader(open(shared_data / "esc10" / "meta.csv")))[::16]
    agree = 0
    for row in rows:
        x, rate = sf.read(shared_data / "esc10" / row["filename"])
        segments = audible_segments(x, rate, 30.0, min_gap_s=1e9)
        agree += abs(segments[0][0] / rate - float(row["core_start_s"])) <= 0.05
    assert agree >= 0.8 * len(rows)
