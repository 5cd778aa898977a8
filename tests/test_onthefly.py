"""Scenes mixed on the fly (train.mixing, train.pools, train.onthefly) and train.fit on them:
world pools split by group, speech labelled by its extent and music as a bed, level changes and
digital silence, reproducibility from (seed, epoch, index), and --resume exactness. Procedural
pools only (tests/procedural.py); tiny models, one thread."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rtsed import load_checkpoint
from rtsed.config import FrontendConfig
from train.augment import AugmentConfig
from train.mixing import MixConfig, ScenePools, mix_scene
from train.onthefly import OnTheFlyScenes, SceneMixer, Sources, scene_seconds
from train.pools import ClipCache, load_pool, load_world, split_world
from train.synth import SynthConfig, synthesize
from procedural import write_event_pool, write_world_pool  # tests/ is on sys.path (not a package)

REPO = Path(__file__).resolve().parents[1]
RATE = 16000
FRAMES = 256  # short training sequences keep the tests quick
QUIET = dict(noise="none", scene_gain_db=(0.0, 0.0), ramp_p=0.0, silence_p=0.0, augment=None)


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("pools")
    return write_event_pool(root / "events"), write_world_pool(root / "world")


def _mix(**kw) -> MixConfig:
    return MixConfig(**{"scene_s": 6.0, **QUIET, **kw})


def _world_scene(pools, seed: int, **kw):
    events, world = pools
    clips = load_world([str(world)])
    train, _ = split_world(clips)
    cfg = _mix(**kw)
    by_cat = {c: [x for x in train if x.label == c] for c in ("speech", "music", "ambience")}
    event_pool = {label: [c for c in load_pool(events) if c.label == label and c.fold in (1, 2)]
                  for label in ("beep", "hiss")}
    scene_pools = ScenePools(event_pool, world=by_cat, labelled=("speech", "music"))
    return cfg, mix_scene(np.random.default_rng(seed), cfg, ClipCache(RATE, 30.0, 1.0), scene_pools)


def test_split_world_holds_out_whole_groups(pools):
    clips = load_world([str(pools[1])])
    train, held = split_world(clips, 0.2)
    again = split_world(list(reversed(clips)), 0.2)
    assert {c.path for c in again[0]} == {c.path for c in train}  # a function of the group names only
    for category in ("speech", "music", "ambience"):
        tr = {c.recording_id for c in train if c.label == category}
        he = {c.recording_id for c in held if c.label == category}
        assert tr and he and not tr & he  # each category keeps groups on both sides, none shared


def test_music_is_a_labelled_bed_and_speech_is_labelled_by_its_extent(pools):
    cfg, scene = _world_scene(pools, 0, events_per_minute=0.0, events_per_minute_range=None,
                              distractors_per_minute=0.0, music_p=1.0,
                              music_cover=(0.5, 0.5), speech_per_minute=30.0, ambience_per_minute=0.0,
                              ambience_bed_p=0.0, ebr_db=(10.0, 10.0))
    music = [(a, b) for label, a, b in scene.labelled if label == "music"]
    speech = [(a, b) for label, a, b in scene.labelled if label == "speech"]
    assert len(music) == 1 and music[0][1] - music[0][0] == cfg.n_samples // 2  # the whole placed span
    assert speech and {label for label, _, _ in scene.labelled} == {"music", "speech"}
    a, b = music[0]
    x = scene.audio
    assert np.abs(x[a:b]).max() > 1e-3
    # Outside the music span and outside speech labels the scene is silent: labels cover the sound.
    quiet = np.ones(len(x), bool)
    for s, e in music + speech:
        quiet[s:e] = False
    assert np.abs(x[quiet]).max() < 1e-3
    assert all(np.abs(x[s:e]).max() > 1e-3 for s, e in speech)
    roles = {role for _, role in scene.used}
    assert roles == {"music", "speech"}


def test_ambience_is_never_labelled_and_levels_follow_the_background(pools):
    cfg, scene = _world_scene(pools, 1, events_per_minute=0.0, events_per_minute_range=None,
                              speech_per_minute=0.0, music_p=0.0,
                              ambience_bed_p=1.0, ambience_per_minute=20.0, background_db=(-40.0, -40.0))
    assert scene.labelled == [] and {r for _, r in scene.used} == {"ambience bed", "ambience"}
    assert scene.levels["background_db"] == -40.0


def test_silence_is_digital_and_cuts_labels(pools):
    cfg, scene = _world_scene(pools, 2, events_per_minute=60.0, music_p=1.0, music_cover=(1.0, 1.0),
                              silence_p=1.0, silence_s=(2.0, 2.0), scene_gain_db=(-20.0, 10.0), ramp_p=1.0)
    x = scene.audio
    zero = np.flatnonzero(x == 0.0)
    run = np.split(zero, np.flatnonzero(np.diff(zero) != 1) + 1)
    longest = max(run, key=len)
    assert len(longest) >= 2 * RATE
    s, e = longest[0], longest[-1] + 1
    assert all(b <= s or a >= e for _, a, b in scene.labelled)  # nothing is labelled in the silence
    assert any(label == "music" for label, _, _ in scene.labelled)  # the bed resumes after it
    assert {"scene_gain_db", "ramp_db", "silence_s"} <= set(scene.levels)


def _dataset(pools, seed=0, augment=None, **mix):
    fe = FrontendConfig.for_rate(RATE)
    cfg = MixConfig(scene_s=scene_seconds(fe, FRAMES), augment=augment, **mix)
    mixer = SceneMixer(Sources(pool=str(pools[0]), world=(str(pools[1]),)), cfg, seed)
    ds = OnTheFlyScenes(mixer, fe, None, seed, 4, FRAMES, augment)
    ds.set_norm(ds.statistics(2))
    return ds


def test_items_are_functions_of_seed_epoch_index(pools):
    a, b = _dataset(pools, augment=AugmentConfig(rooms=2)), _dataset(pools, augment=AugmentConfig(rooms=2))
    assert a.mixer.labels == ("beep", "hiss", "speech", "music")
    assert a.norm == b.norm
    a.epoch, b.epoch = 3, 3
    x1, y1, m1, _ = a[1]
    x2, y2, m2, _ = b[1]
    assert x1.shape == (FRAMES, 40) and y1.shape == (FRAMES, 4) and m1.shape == (FRAMES,)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(m1, m2)
    b.epoch = 4
    assert not torch.equal(b[1][0], x1)  # a new epoch is a new draw
    assert not torch.equal(a[2][0], x1)


def test_labels_follow_audio_in_augmented_training_scenes(pools):
    """One class, no background: every labelled frame has sound, and every loud frame a label,
    with pitch, stretch and reverberation on every event."""
    aug = AugmentConfig(pitch_p=1.0, stretch_p=1.0, reverb_p=1.0, eq_p=0.0, bandpass_p=0.0, noise_p=0.0,
                        freq_masks=0, time_masks=0, rooms=4)
    fe = FrontendConfig.for_rate(RATE)
    cfg = MixConfig(scene_s=scene_seconds(fe, FRAMES), augment=aug, noise="none", scene_gain_db=(0.0, 0.0),
                    ramp_p=0.0, silence_p=0.0, events_per_minute=20.0)
    mixer = SceneMixer(Sources(pool=str(pools[0]), classes=("beep",)), cfg, 0)
    ds = OnTheFlyScenes(mixer, fe, None, 0, 4, FRAMES, aug)
    for i in range(4):
        feats, targets, _ = ds.features(0, i)
        power = np.exp(feats).sum(axis=1)
        labelled = targets[:, 0] > 0
        assert labelled.any()
        assert np.all(power[labelled] > power.max() * 10 ** (-50 / 10))
        # Frame t's window reaches one hop into cell t + 1: the frame before an onset may hear it.
        covered = labelled | np.concatenate([labelled[1:], [False]])
        loud = power > power.max() * 10 ** (-20 / 10)
        assert not np.any(loud & ~covered), (i, np.flatnonzero(loud & ~covered), np.flatnonzero(labelled))


# ------------------------------------------------------------------------------ train.fit on the fly


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RTSED_ALLOCATOR", "RTSED_ALLOCATOR_REEXEC", "LD_PRELOAD")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RTSED_ALLOCATOR="system",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    return env


@pytest.fixture(scope="module")
def val_scenes(pools, tmp_path_factory):
    """Fixed validation files written by train.synth from the same pools (held-out world groups)."""
    out = tmp_path_factory.mktemp("val")
    cfg = SynthConfig(pool=str(pools[0]), world=(str(pools[1]),), scenes=(0, 2, 0), scene_s=8.0, seed=1,
                      **{k: v for k, v in dataclasses.asdict(MixConfig()).items()
                         if k not in ("scene_s", "augment")})
    manifest = synthesize(cfg, out)
    assert manifest["labels"] == ["beep", "hiss", "speech", "music"]
    train_groups = set(manifest["world_groups"]["train"])
    used = {c["recording_id"] for c in manifest["splits"]["validate"]["clips"] if c["role"] in
            ("speech", "music", "ambience", "ambience bed")}
    assert used and not used & train_groups  # validation hears held-out speakers and albums only
    return out


def _fit_args(pools, val_scenes, out: Path, *extra: str) -> list[str]:
    return ["--model", "dnd_7_10", "--set", "model.channels=8", "--set", "model.dropout=0.1",
            "--events", str(pools[0]), "--world", str(pools[1]), "--data", str(val_scenes), "--out", str(out),
            "--cache-dir", str(out.parent / "cache"), "--batch-size", "2", "--steps-per-epoch", "2",
            "--stats-scenes", "2", "--set", "augment.rooms=2", "--save-every-s", "0", *extra]


def _run(args: list[str], script: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(script or ["-m", "train.fit"]), *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


def test_fit_on_the_fly_end_to_end_and_resume_is_exact(pools, val_scenes, tmp_path):
    full = _run(_fit_args(pools, val_scenes, tmp_path / "full", "--epochs", "2", "--workers", "1",
                          "--sequence-frames", str(FRAMES)))
    assert full.returncode == 0, full.stderr[-3000:]
    lines = [line for line in full.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and all("event_F1" in line and "per batch: make" in line for line in lines)
    assert "fresh training scenes per epoch" in full.stdout
    ckpt = load_checkpoint(tmp_path / "full" / "best.pt")
    assert ckpt.config.labels == ("beep", "hiss", "speech", "music")
    meta = ckpt.metadata
    assert meta["select"] == "tuned_event_f1" and meta["onthefly"]["mix"]["scene_s"] == pytest.approx(
        scene_seconds(FrontendConfig.for_rate(RATE), FRAMES))
    assert MixConfig.from_dict(meta["onthefly"]["mix"]).augment == AugmentConfig(rooms=2)
    history = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["progress"]["history"]
    assert all(r["batch_make_s"] > 0 and r["batch_step_s"] > 0 for r in history)

    # SIGKILLed after 3 optimiser steps (mid epoch 2), then resumed: the same weights as uninterrupted.
    part = tmp_path / "part"
    killed = _run(_fit_args(pools, val_scenes, part, "--epochs", "2", "--workers", "1",
                            "--sequence-frames", str(FRAMES)), script=["tests/fit_killed.py", "3"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _run(_fit_args(pools, val_scenes, part, "--epochs", "2", "--workers", "0",
                             "--sequence-frames", str(FRAMES), "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(part / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other = _run(_fit_args(pools, val_scenes, part, "--epochs", "3", "--set", "mix.ebr_db=[5,10]",
                           "--sequence-frames", str(FRAMES), "--resume"))
    assert other.returncode != 0 and "other on-the-fly scenes" in other.stderr


def test_batch_vs_step_benchmark_reports_both_side_by_side():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rtsed_batch_vs_step", REPO / "benchmarks" / "batch_vs_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = torch.get_num_threads()
    try:
        rows = module.main(["--procedural", "--batch", "2", "--frames", "64", "--batches", "2", "--workers", "0"])
    finally:
        torch.set_num_threads(before)
    values = {name.split(" (")[0]: value for name, value, _ in rows}
    assert values["make a batch"] > 0 and values["train step"] > 0
    assert any(name.startswith("train.fit loop, 0 worker(s)") for name, _, _ in rows)


def test_validation_scores_what_users_see():
    """validate_events decodes with the checkpoint's decoder and scores event F1 (DESIGN.md's
    collars) and PSDS1; selection_score ranks epochs by them (or by minus the loss)."""
    import train.fit as fit
    from rtsed.config import DecoderConfig

    hop = 0.02
    labels = ("beep", "hiss")

    class Oracle(torch.nn.Module):  # logits +8 inside [1 s, 2 s) for beep, -8 elsewhere
        def forward(self, x):
            t = torch.arange(x.shape[1])[None, :, None] * hop
            beep = ((t >= 1.0) & (t < 2.0)).float()
            return torch.cat([beep, torch.zeros_like(beep)], dim=2) * 16 - 8

    files = [("a.wav", np.zeros((200, 40), np.float32))]
    right = [("a.wav", 1.0, 2.0, "beep")]
    scores, used = fit.validate_events(Oracle(), files, right, labels, hop, DecoderConfig(), torch.device("cpu"),
                                       psds=True)
    assert scores["val_event_f1"] == pytest.approx(1.0) and scores["val_psds1"] > 0.5 and used == DecoderConfig()
    wrong = [("a.wav", 3.0, 3.5, "beep")]
    scores, _ = fit.validate_events(Oracle(), files, wrong, labels, hop, DecoderConfig(), torch.device("cpu"))
    assert scores["val_event_f1"] == 0.0 and "val_psds1" not in scores
    assert fit.selection_score("loss", {"val_loss": 0.3}) == -0.3
    assert fit.selection_score("event_f1", {"val_event_f1": 0.4, "val_loss": 9.0}) == 0.4
    assert fit.selection_score("tuned_event_f1", {"val_event_f1": 0.4, "val_loss": 9.0}) == 0.4


def test_validation_can_tune_the_decoder_it_scores():
    """With tune_smoothing_s, validation scores the events of the decoder train.tune chooses on
    the same probabilities: a weak model whose probabilities never reach 0.5 scores 0 with the
    default decoder and 1 with the tuned one, and the tuned decoder comes back (to be saved)."""
    import train.fit as fit
    from rtsed.config import DecoderConfig

    hop = 0.02
    labels = ("beep", "hiss")

    class Timid(torch.nn.Module):  # p = 0.3 inside [1 s, 2 s) and [4 s, 4.5 s) for beep, 0.05 elsewhere
        def forward(self, x):
            t = torch.arange(x.shape[1])[None, :, None] * hop
            beep = (((t >= 1.0) & (t < 2.0)) | ((t >= 4.0) & (t < 4.5))).float()
            p = torch.cat([0.05 + 0.25 * beep, torch.full_like(beep, 0.05)], dim=2)
            return torch.log(p / (1 - p))

    files = [("a.wav", np.zeros((300, 40), np.float32))]
    refs = [("a.wav", 1.0, 2.0, "beep"), ("a.wav", 4.0, 4.5, "beep")]
    plain, used = fit.validate_events(Timid(), files, refs, labels, hop, DecoderConfig(), torch.device("cpu"))
    assert plain["val_event_f1"] == 0.0 and used == DecoderConfig()
    tuned, decoder = fit.validate_events(Timid(), files, refs, labels, hop, DecoderConfig(), torch.device("cpu"),
                                         tune_smoothing_s=0.3)
    assert tuned["val_event_f1"] == pytest.approx(1.0)
    assert 0.05 < decoder.on_thresholds[0] <= 0.3 and decoder.on_thresholds[1] == 0.5  # hiss has no events
    assert max(decoder.per_class("smoothing_frames", len(labels))) <= 31  # a 0.3 s delay: (31 - 1) / 2 frames


def test_synth_cli_writes_world_scenes_like_training(pools, tmp_path, capsys):
    from train.synth import main

    out = tmp_path / "scenes"
    assert main(["--pool", str(pools[0]), "--world", str(pools[1]), "--out", str(out), "--scene-s", "5",
                 "--scenes", "1", "1", "0", "--mix", "default", "--set", "augment={\"rooms\": 2}",
                 "--set", "silence_p=1.0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    cfg = manifest["config"]
    assert cfg["augment"]["rooms"] == 2 and cfg["silence_p"] == 1.0 and cfg["ebr_db"] == [0.0, 20.0]
    assert cfg["scene_s"] == 5.0  # the flag, not MixConfig's default
    assert all("silence_s" in s["levels"] for split in manifest["splits"].values() for s in split["scenes"])
    assert set(manifest["world_groups"]["validate"]) and not (
        set(manifest["world_groups"]["validate"]) & set(manifest["world_groups"]["train"]))
    with pytest.raises(SystemExit):
        main(["--pool", str(pools[0]), "--out", str(tmp_path / "bad"), "--set", "no_such_field=1"])
    assert "unknown config field" in capsys.readouterr().err


def test_event_density_varies_per_scene_when_a_range_is_given(pools):
    counts = {_world_scene(pools, seed, events_per_minute_range=(0.0, 60.0), music_p=0.0, speech_per_minute=0.0,
                           ambience_per_minute=0.0, ambience_bed_p=0.0)[1].levels["events_per_minute"]
              for seed in range(6)}
    assert len(counts) == 6 and min(counts) >= 0 and max(counts) <= 60
    fixed = _world_scene(pools, 0, events_per_minute_range=None, events_per_minute=30.0, music_p=0.0,
                         speech_per_minute=0.0, ambience_per_minute=0.0, ambience_bed_p=0.0)[1]
    assert "events_per_minute" not in fixed.levels and len(fixed.used) == 3  # 30/min x 6 s
