"""The false-alarm folder for tuning (train.heldout_world): only the world groups that the scenes'
manifest holds out for the split, in the layout train.false_alarms reads, never training groups."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import soundfile as sf

from train.false_alarms import categorised_audio
from train.heldout_world import HeldOutWorldError, build, main

RATE = 16000


@pytest.fixture
def pool(tmp_path):
    """A world pool: speech groups s1 (train), s2 (validate), s3 (test); music m1 (train), m2
    (validate) with four 3 s clips."""
    root = tmp_path / "pool"
    rows = []
    clips = [("speech", "spk", g, i, 1.0) for g in ("s1", "s2", "s3") for i in range(2)]
    clips += [("music", "alb", g, i, 3.0) for g in ("m1", "m2") for i in range(4)]
    for category, source, group, i, seconds in clips:
        name = f"{category}/{source}/{group}_{i}.flac"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / name, 0.1 * np.ones(int(seconds * RATE), np.float32), RATE)
        rows.append({"filename": name, "category": category, "split": "train", "source": source, "group": group,
                     "duration_s": seconds, "license": "CC0", "attribution": f"{group} by someone"})
    with open(root / "meta.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    (scenes / "manifest.json").write_text(json.dumps({"world_groups": {
        "train": ["spk/s1", "alb/m1"], "validate": ["spk/s2", "alb/m2"], "test": ["spk/s3"]}}))
    return root, scenes


def test_only_the_split_groups_in_false_alarm_layout(pool, tmp_path):
    root, scenes = pool
    rows = build(scenes, [root], tmp_path / "fa")
    assert sorted({(r["source"], r["group"]) for r in rows}) == [("alb", "m2"), ("spk", "s2")]
    files = categorised_audio(tmp_path / "fa")
    assert len(files) == 2 + 4
    for path, category in files:
        assert path.resolve().is_relative_to(root.resolve())
        assert category == path.relative_to(tmp_path / "fa").parts[1]  # pool/<category>/...
        assert any(g in path.name for g in ("s2_", "m2_"))


def test_a_budget_takes_clips_evenly(pool, tmp_path):
    root, scenes = pool
    rows = build(scenes, [root], tmp_path / "fa", minutes_per_category=0.1)  # 6 s of the 12 s of music
    music = [r["filename"] for r in rows if r["category"] == "music"]
    assert music == ["pool/music/alb/m2_0.flac", "pool/music/alb/m2_2.flac"]
    assert sum(r["category"] == "speech" for r in rows) == 2  # 2 s: under the budget, all kept


def test_training_groups_and_unknown_splits_are_refused(pool, tmp_path):
    root, scenes = pool
    with pytest.raises(HeldOutWorldError, match="trained on"):
        build(scenes, [root], tmp_path / "a", split="train")
    with pytest.raises(HeldOutWorldError, match="no world groups for split 'dev'"):
        build(scenes, [root], tmp_path / "b", split="dev")


def test_groups_missing_from_the_pools_are_named(pool, tmp_path, capsys):
    root, scenes = pool
    (scenes / "manifest.json").write_text(json.dumps({"world_groups": {"validate": ["spk/s2", "other/x"]}}))
    assert main(["--scenes", str(scenes), "--world", str(root), "--out", str(tmp_path / "fa")]) == 2
    err = capsys.readouterr().err
    assert "other/x" in err and "pass the pools the scenes were made from" in err


def test_an_existing_folder_is_not_overwritten(pool, tmp_path):
    root, scenes = pool
    (tmp_path / "fa").mkdir()
    (tmp_path / "fa" / "keep.txt").write_text("mine")
    with pytest.raises(HeldOutWorldError, match="not empty"):
        build(scenes, [root], tmp_path / "fa")
    assert (tmp_path / "fa" / "keep.txt").read_text() == "mine"
