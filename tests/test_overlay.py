"""train.overlay: the same scenes over speech and music. The scene's events survive untouched, the
added speech is labelled where its energy is, music over its span, and a seed fixes every byte."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from procedural import write_event_pool, write_world_pool
from train.annotations import read_dcase_tsv
from train.overlay import OverlayError, main, overlay
from train.synth import main as synth


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("overlay")
    events = write_event_pool(root / "events")
    write_world_pool(root / "world", groups={"speech": ("spk_a",), "music": ("album_a",)})
    synth(["--pool", str(events), "--scene-s", "8", "--scenes", "0", "0", "3", "--seed", "5", "--noise", "pink",
           "--out", str(root / "scenes")])
    return root


def test_scene_events_are_kept_and_speech_and_music_added(folders, tmp_path):
    # Music in every scene, speech dense enough that every scene gets some.
    manifest = overlay(folders / "scenes", "test", folders / "world", tmp_path / "out", seed=1, music_p=1.0,
                       speech_per_minute=30.0)
    before = read_dcase_tsv(folders / "scenes" / "test" / "annotations.tsv")
    after = read_dcase_tsv(tmp_path / "out" / "test" / "annotations.tsv")
    added = [e for e in after if e.event_label in ("speech", "music")]
    key = lambda e: (e.filename, e.onset_s, e.offset_s, e.event_label)  # noqa: E731
    assert sorted(map(key, before)) == sorted(key(e) for e in after if e.event_label not in ("speech", "music"))
    assert {e.event_label for e in added} == {"speech", "music"}
    assert manifest["labels"][-2:] == ["speech", "music"] and manifest["world_files"]
    checked = 0
    for path in sorted((folders / "scenes" / "test" / "audio").iterdir()):
        original, rate = sf.read(path)
        mixed, _ = sf.read(tmp_path / "out" / "test" / "audio" / path.name)
        assert mixed.shape == original.shape
        mine = [e for e in added if e.filename == path.name]
        music = [e for e in mine if e.event_label == "music"]
        assert len(music) == 1
        # Outside the music bed (and its fade) the only addition is speech: its labels hold the energy.
        diff = mixed - original
        speech = np.zeros(diff.size, bool)
        for e in mine:
            if e.event_label == "speech":
                speech[int(e.onset_s * rate):int(np.ceil(e.offset_s * rate))] = True
        bed = np.zeros(diff.size, bool)
        bed[int(music[0].onset_s * rate):int(np.ceil(music[0].offset_s * rate))] = True
        outside = ~bed
        if speech[outside].any():
            inside_energy = np.sum(diff[outside & speech] ** 2)
            assert inside_energy > 0.95 * np.sum(diff[outside] ** 2) - 1e-6  # PCM_16 rounding aside
            checked += 1
    assert checked > 0  # some speech fell outside a music bed, where its energy can be checked


def test_same_seed_same_bytes(folders, tmp_path):
    overlay(folders / "scenes", "test", folders / "world", tmp_path / "a", seed=3)
    overlay(folders / "scenes", "test", folders / "world", tmp_path / "b", seed=3)
    overlay(folders / "scenes", "test", folders / "world", tmp_path / "c", seed=4)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()
               for f in files if f.suffix == ".wav")


def test_bad_inputs_are_named(folders, tmp_path, capsys):
    with pytest.raises(OverlayError, match="no meta.csv"):
        overlay(folders / "scenes", "test", tmp_path, tmp_path / "x")
    with pytest.raises(OverlayError, match="no validate/annotations.tsv"):
        overlay(folders / "scenes", "validate", folders / "world", tmp_path / "x")
    overlay(folders / "scenes", "test", folders / "world", tmp_path / "y")
    assert main(["--scenes", str(folders / "scenes"), "--world", str(folders / "world"), "--out", str(tmp_path / "y")]) == 2
    assert "already holds files" in capsys.readouterr().err
