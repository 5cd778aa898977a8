"""Training scenes mixed on the fly: a fresh draw every epoch, reproducible from (seed, epoch, index).

:class:`SceneMixer` loads the pools once (event clips by fold, distractors, world pools: speech,
music, everyday sound) into a :class:`train.pools.MemoryStore` and mixes scenes with
:func:`train.mixing.mix_scene`, the function that writes train.synth's files. :class:`OnTheFlyScenes`
is the torch Dataset: item i of epoch e is the scene of ``default_rng([seed, e, i])``, one training
sequence long, returned as ``SequenceDataset`` returns its items (normalised log-mel (T, F),
frame targets (T, C), loss mask (T,)) plus the seconds it took to make. Nothing else feeds it, so
a resumed run sees exactly the scenes an uninterrupted one would, in any worker process.

Validation and test scenes stay fixed files (``python -m train.synth`` with the same pools and
``--mix``): the world pools' held-out groups (train.pools.split_world) feed validation, never
training.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from rtsed.config import FrontendConfig, NormalizationStats
from rtsed.audio.frontend import LogMel
from train.annotations import Event, events_to_frame_targets
from train.augment import AugmentConfig, WaveAugmenter, spec_augment
from train.features import FileFeatures, normalization_stats
from train.mixing import LABELLED_WORLD, MixConfig, Scene, ScenePools, mix_scene
from train.pools import MemoryStore, subset_by_minutes

STATS_KEY = 2**32 - 1  # the "epoch" of the fixed draw that gives the normalisation statistics


@dataclass(frozen=True, kw_only=True)
class Sources:
    """Where on-the-fly scenes come from (the source fields of train.synth.SynthConfig)."""

    pool: str  # event clips (e.g. ../shared/data/esc10)
    distractors: str | None = None
    world: tuple[str, ...] = ()
    folds: tuple[tuple[int, ...], ...] = ((1, 2), (3,), (4,))
    classes: tuple[str, ...] | None = None
    licenses: tuple[str, ...] | None = None
    bed_classes: tuple[str, ...] = ()
    world_held_out: float = 0.2
    world_classes: tuple[str, ...] = LABELLED_WORLD
    world_minutes: float | None = 120.0  # per world category held in memory (a random subset by seed)
    test_world: tuple[str, ...] = ()  # never read here; train.synth's field, for split_pools

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


class SceneMixer:
    """The training split's pools in memory and the scene mixer over them."""

    def __init__(self, sources: Sources, mix: MixConfig, seed: int = 0):
        from train.synth import split_pools  # train.synth imports this module's neighbours, not it

        self.sources, self.mix = sources, mix
        labels, _, pools, groups = split_pools(sources, scenes=(1, 0, 0))
        train = pools["train"]
        rng = np.random.default_rng([seed, STATS_KEY, 1])
        world_clips = subset_by_minutes([c for cs in train.world.values() for c in cs], sources.world_minutes, rng)
        clips = [c for cs in list(train.events.values()) + list(train.beds.values()) for c in cs]
        clips += train.distractors + world_clips
        self.store = MemoryStore(clips, mix.sample_rate_hz, mix.label_db, mix.min_gap_s)
        silent_events = [c for cs in train.events.values() for c in cs if c not in self.store]
        if silent_events:
            from train.mixing import MixError

            raise MixError(f"silent event clip(s): {[str(c.path) for c in silent_events[:5]]}")
        world = {k: [c for c in world_clips if c.label == k and c in self.store] for k in train.world}
        self.pools = ScenePools(train.events, train.beds, [c for c in train.distractors if c in self.store],
                                {k: v for k, v in world.items() if v}, train.labelled)
        self.labels = tuple(labels)
        self.world_groups = groups["train"]
        self.augmenter = WaveAugmenter(mix.augment, mix.sample_rate_hz) if mix.augment is not None else None

    def scene(self, rng: np.random.Generator) -> Scene:
        return mix_scene(rng, self.mix, self.store, self.pools, self.augmenter)

    def summary(self) -> str:
        world = ", ".join(f"{k} {len(v)} files" for k, v in sorted(self.pools.world.items())) or "none"
        return (f"on-the-fly scenes of {self.mix.scene_s:g} s: {len(self.labels)} classes {list(self.labels)}; "
                f"{sum(len(v) for v in self.pools.events.values())} event clips, "
                f"{len(self.pools.distractors)} distractors, world: {world}; "
                f"{self.store.seconds / 60:.1f} min of audio in memory ({self.store.nbytes / 2**20:.0f} MiB int16)")


def scene_seconds(frontend: FrontendConfig, frames: int) -> float:
    """The scene length whose log-mel has exactly ``frames`` frames (no centring)."""
    return ((frames - 1) * frontend.hop_samples + frontend.window_samples) / frontend.sample_rate_hz


class OnTheFlyScenes(Dataset):
    """Item i of the current epoch: (x (T, F) normalised, y (T, C), mask (T,), seconds to make it).

    ``epoch`` is an attribute: set it before each epoch's DataLoader iterator is created (forked
    workers copy it then). ``features`` draws from any key, e.g. :data:`STATS_KEY`."""

    def __init__(self, mixer: SceneMixer, frontend: FrontendConfig, norm: NormalizationStats | None,
                 seed: int, scenes_per_epoch: int, sequence_frames: int, augment: AugmentConfig | None = None):
        if round(mixer.mix.scene_s * frontend.sample_rate_hz) != round(scene_seconds(frontend, sequence_frames)
                                                                       * frontend.sample_rate_hz):
            raise ValueError("OnTheFlyScenes: the mixer's scene_s must be scene_seconds(frontend, sequence_frames)")
        self.mixer, self.frontend, self.seed = mixer, frontend, seed
        self.scenes_per_epoch, self.sequence_frames, self.augment = scenes_per_epoch, sequence_frames, augment
        self.epoch = 0
        self._logmel = LogMel(frontend)
        self.set_norm(norm)

    def set_norm(self, norm: NormalizationStats | None) -> None:
        self.norm = norm
        if norm is not None:
            self._mean = np.asarray(norm.mean, dtype=np.float32)
            self._std = np.asarray(norm.std, dtype=np.float32)

    def __len__(self) -> int:
        return self.scenes_per_epoch

    def features(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
        """(log-mel (T, F) float32, targets (T, C) float32, the generator left after mixing)."""
        rng = np.random.default_rng([self.seed, epoch, index])
        scene = self.mixer.scene(rng)
        with torch.no_grad():
            feats = self._logmel(torch.from_numpy(scene.audio.astype(np.float32))).numpy()
        rate = self.mixer.mix.sample_rate_hz
        events = [Event("scene", a / rate, b / rate, label) for label, a, b in scene.labelled]
        targets = events_to_frame_targets(events, feats.shape[0], self.frontend.hop_s, self.mixer.labels)
        return feats, targets, rng

    def statistics(self, n_scenes: int) -> NormalizationStats:
        """Per-band mean and std over a fixed draw of n_scenes scenes (key STATS_KEY), unaugmented features."""
        files = []
        for i in range(n_scenes):
            feats, targets, _ = self.features(STATS_KEY, i)
            files.append(FileFeatures(None, feats, targets))  # type: ignore[arg-type]
        return normalization_stats(files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.norm is None:
            raise RuntimeError("OnTheFlyScenes: set_norm() before drawing training items")
        started = time.perf_counter()
        feats, targets, rng = self.features(self.epoch, i)
        x = (feats - self._mean) / self._std
        mask = np.ones(x.shape[0], dtype=np.float32)
        if self.augment is not None:
            x, mask = spec_augment(x, mask, rng, self.augment)
        seconds = time.perf_counter() - started
        return (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(targets),
                torch.from_numpy(mask), torch.tensor(seconds, dtype=torch.float64))


def worker_init(_worker_id: int) -> None:
    """DataLoader workers: one thread each (the train step owns the cores)."""
    torch.set_num_threads(1)
