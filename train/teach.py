"""``python -m train.teach``: new classes for a trained detector from a handful of clips, in minutes on a CPU.

    python -m train.teach --from dnd_7_10 --add doorbell=clips/doorbell/ --out my_detector.pt
    python -m train.teach --from dnd_7_10 --add doorbell=clips/doorbell/ --add kettle=clips/kettle/ \\
        --negatives clips/not_events/ --world ../pool --out my_detector.pt
    python -m train.teach --from my_detector.pt --negatives new_false_alarms/ --out my_detector.pt

How (the design, and why):

- **Frozen trunk, new rows on the head.** The detector's CNN blocks and temporal part are kept
  as they are (eval mode: BatchNorm on its running statistics); the classifier gets one output row
  per new class appended after the old ones, whose rows are copied. With the trunk frozen, a
  frame's embedding (the temporal part's output, ``out_features`` per frame: 21,504 for dnd_7_10)
  does not change during teaching, so every training scene goes through the trunk once and the
  head is fitted on the cached embeddings: a logistic regression per class, convex, fitted by
  full-batch L-BFGS (a few dozen passes over the cached frames, each two (N, D) x (D, C)
  products) with an L2 penalty relative to the embeddings' scale, stopped early when the loss on
  the held-out clips' scenes stops falling. Thousands of small minibatch steps did the same work
  at several times the CPU time.
- **Scenes in context.** Training scenes are mixed by train.mixing over whatever the user gives:
  the new clips (labelled by their audible extent, train.mixing's rule, or by ``--extents`` TSV
  rows ``filename onset offset``), ``--negatives`` clips, ``--world`` pools (speech, music,
  ambience; whole groups held out for validation), ``--distractors`` (an event-pool folder mixed
  unlabelled) and generated noise beds of a colour and level drawn per scene; pitch, stretch,
  reverberation and microphone augmentation (train.augment) on by default. Without a world pool the
  scenes are the clips over noise, which teaches less about the world (more false alarms).
- **Old classes kept.** With no ``--negatives`` the old rows are not trained at all: old classes
  output exactly what they did (bit for bit on the same input). With ``--negatives`` the old rows
  are trained too, by distillation: their target on every frame is the original detector's own
  probability on that frame, 1 inside a recorded clip of that class, and 0 inside a negative
  (the user says nothing sounds there that the detector should report). The old classes' clips
  that an earlier ``train.teach`` recorded in the checkpoint (found on disk by path and sha256)
  are mixed into the scenes so that the classes sound where the negatives are taught; the
  negatives also go in whole, as recorded, where false alarms are heard. Each old row's loss
  weighs negative frames, its own class's frames and the rest equally (a few seconds of
  negatives neither drown nor are drowned), with an L2-SP pull toward the original rows. Then,
  since head rows on a frozen trunk cannot pull apart a negative that the trunk maps near a class,
  the last block (``model.temporal``) and the classifier are adapted by Adam over the same scenes'
  cached CNN outputs, with an L2-SP pull toward their starting weights. Where a negative overlaps
  a new-class event, the new class keeps its label.
- **Old-class check (with ``--negatives``).** An old class whose recorded clips include held-out
  ones (an earlier ``train.teach`` kept them; otherwise ``--held-out`` of them are kept now) is
  scored before and after on ``check_scenes`` scenes of those clips: frame F1 of the events its
  own decoder reports. A head row that scores less than the original is moved back toward it,
  keeping the largest share of its change (1/2, 1/4, 1/8, else none) that scores at least the
  original (exact on the frozen trunk); the last block is then not adapted (such a row holds only
  on the original block), and an adapted block under which a checked class scores less is undone.
  Where the trunk maps a negative near a class, silencing it costs the class, and the class wins:
  what is left of its false alarms stays, and the model card says so. Distillation alone does not
  hold such a class: its row loses the class's frames (lower probability inside, higher outside)
  and the decoder tuned on the original probabilities then splits or misses its events. Classes
  with no recorded clips (a bundled detector's) are held by distillation alone, unchecked.
- **Held-out check and decoder.** ``--held-out`` (20 %, at least one clip) of each new class's clips
  never enter training scenes: they make fixed validation scenes (with the world pools' held-out
  groups), on which train.tune's search chooses each new class's decoder (median window, on/off
  thresholds, minimum duration and gap); old classes keep theirs. The validation event F1 is
  printed and recorded.
- **Output.** An ordinary rtsed checkpoint (``rtsed.live``, ``rtsed.detect``, ``rtsed.export``,
  ``rtsed.serve`` take it as is) whose metadata records the clips used (name, sha256, training or
  held out, class) and the settings, and a model card ``<out>.md`` beside it.

Bad input fails before any compute with an error that names the fix: fewer than 5 clips for a
class, a label the detector already has, an unreadable or silent file, an empty folder.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rtsed.audio.files import AudioFileError, read_audio
from rtsed.audio.frontend import LogMel
from rtsed.audio.files import AUDIO_SUFFIXES, audio_files_under
from rtsed.config import DecoderConfig, DetectorConfig
from rtsed.models.bundled import ModelNotFoundError, resolve_model
from rtsed.models.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from rtsed.models.model import SEDModel
from rtsed.serve.decode import decode_offline
from train.annotations import Event, events_to_frame_targets
from train.mixing import Clip, MixConfig, MixError, ScenePools, audible_segments, excerpt_start, mix_scene
from train.tune import default_max_smoothing_s, tune_decoder

MIN_CLIPS = 5
NEGATIVE = "__negative__"  # the mixer's label for negative clips' extents; never a class
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
NOISES = ("white", "pink", "brown")
TAUGHT_SHARES = (0.5, 0.25, 0.125)  # the shares of an old row's change tried, largest first, when it loses its class


class TeachError(ValueError):
    """Input that cannot be taught from; the message names the file or argument and the fix."""


@dataclass(frozen=True)
class TeachConfig:
    """How much and how to teach. Scenes are ``scene_frames`` frames long (10.26 s at 20 ms)."""

    scenes: int = 48  # training scenes, each through the frozen trunk once
    val_scenes: int = 8  # validation scenes from the held-out clips (decoder tuning)
    scene_frames: int = 512
    head_steps: int = 60  # at most this many passes of L-BFGS over the cached frame embeddings
    patience: int = 10  # passes without a better held-out loss before the head fit stops
    new_l2: float = 1e-3  # L2 of the new rows, relative to the embeddings' scale (see fit_head)
    old_l2: float = 1e-2  # L2-SP pull of the old rows toward the original weights (with --negatives)
    held_out: float = 0.2  # fraction of each new class's clips kept for validation (at least one)
    hold_tolerance: float = 0.0  # with --negatives: most frame F1 an old class may lose on its held-out clips
    check_scenes: int = 16  # with --negatives: scenes of the old classes' held-out clips that check them
    adapt_epochs: int = 20  # with --negatives: Adam passes over the scenes adapting the last block
    adapt_lr: float = 1e-3
    adapt_l2: float = 1e-2  # L2-SP pull of the adapted block toward its original weights
    adapt_batch_scenes: int = 4
    background_every: int = 4  # keep every n-th frame that no clip labels (weighted n): bounds memory
    events_per_minute: tuple[float, float] = (12.0, 36.0)
    noise_db: tuple[float, float] = (-70.0, -45.0)
    augment: bool = True
    world_minutes: float = 30.0  # per world category held in memory
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [(self.scenes >= 1 and self.val_scenes >= 1 and self.check_scenes >= 1,
                   "scenes, val_scenes and check_scenes must be >= 1"),
                  (self.scene_frames >= 64, "scene_frames must be >= 64"),
                  (self.head_steps >= 1 and self.patience >= 1, "head_steps and patience must be >= 1"),
                  (self.new_l2 > 0 and self.old_l2 > 0, "new_l2 and old_l2 must be > 0"),
                  (0 < self.held_out < 1, "held_out must lie in (0, 1)"),
                  (0 <= self.hold_tolerance < 1, "hold_tolerance must lie in [0, 1)"),
                  (self.background_every >= 1, "background_every must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise TeachError(f"TeachConfig: {message}")


@dataclass
class UserClip:
    """One of the user's clips, decoded: (n,) float64 at the model's rate, its labelled extents
    as sample ranges [a, b), and the file's sha256."""

    path: Path
    label: str  # the new class, or NEGATIVE
    audio: np.ndarray
    segments: list[tuple[int, int]]
    sha256: str
    extent_source: str  # "audio" (train.mixing's rule) or the TSV it came from
    held_out: bool = False

    def clip(self, index: int) -> Clip:
        return Clip(self.path, self.path.name, self.label, 1, f"{self.label}/{index}/{self.path.name}")

    def record(self, rate: int) -> dict[str, Any]:
        return {"file": self.path.name, "path": str(self.path), "sha256": self.sha256,
                "class": None if self.label == NEGATIVE else self.label, "seconds": round(len(self.audio) / rate, 3),
                "extent": self.extent_source, "split": "held_out" if self.held_out else "train"}


# ------------------------------------------------------------------------------------- inputs


def audio_files(folder: str | Path, what: str) -> list[Path]:
    """The audio files under ``folder`` (recursively, rtsed.detect's suffixes), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise TeachError(f"{what} {root}: no such folder; give a folder of audio clips")
    files = audio_files_under(root)
    if not files:
        raise TeachError(f"{what} {root}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in it")
    return files


def read_extents(tsv: str | Path) -> dict[str, list[tuple[float, float]]]:
    """``filename onset offset`` rows (tab-separated, header line; seconds) -> {file name: extents}."""
    path = Path(tsv)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TeachError(f"--extents {path}: cannot read it ({exc})") from None
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    missing = {"filename", "onset", "offset"} - set(rows[0].keys() if rows else ())
    if missing:
        raise TeachError(f"--extents {path}: needs a header line 'filename<TAB>onset<TAB>offset' and one row "
                         f"per event (missing {sorted(missing)})")
    out: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(rows, start=2):
        try:
            onset, offset = float(row["onset"]), float(row["offset"])
        except (TypeError, ValueError):
            raise TeachError(f"--extents {path}: line {i}: onset and offset must be seconds") from None
        if not 0 <= onset < offset:
            raise TeachError(f"--extents {path}: line {i}: needs 0 <= onset < offset, got {onset}, {offset}")
        out.setdefault(Path(row["filename"].strip()).name, []).append((onset, offset))
    return out


def load_clips(files: list[Path], label: str, rate: int, mix: MixConfig,
               extents: dict[str, list[tuple[float, float]]] | None = None, extents_name: str = "") -> list[UserClip]:
    """Decode every file (any format and rate, downmixed, resampled to ``rate``) and find its
    extents; every unreadable or silent file is listed in one error."""
    clips, problems = [], []
    for path in files:
        try:
            x = read_audio(path, rate).astype(np.float64)
        except AudioFileError as exc:
            problems.append(str(exc))
            continue
        if extents and path.name in extents:
            segments = [(round(a * rate), min(round(b * rate), len(x))) for a, b in extents[path.name]]
            segments = [(a, b) for a, b in segments if a < b]
            source = extents_name
        else:
            segments = audible_segments(x, rate, mix.label_db, mix.min_gap_s)
            source = "audio"
        if not segments:
            problems.append(f"{path}: silent (no sound above the silence floor), or its --extents rows lie past "
                            "its end: remove it or record it again")
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        clips.append(UserClip(path, label, x, segments, digest, source))
    if problems:
        raise TeachError(f"{len(problems)} clip(s) for {label if label != NEGATIVE else '--negatives'} cannot be "
                         "used:\n  " + "\n  ".join(problems) + "\nfix or remove them and run again")
    return clips


def hold_out(clips: list[UserClip], fraction: float, seed: int) -> None:
    """Mark ceil(fraction x n) clips (at least one, never all) as held out, chosen by a seeded draw over the
    clips' hashes: the same files give the same split whatever their order on disk."""
    order = sorted(range(len(clips)), key=lambda i: hashlib.sha256(f"{seed}:{clips[i].sha256}".encode()).hexdigest())
    for i in order[: min(len(clips) - 1, max(1, math.ceil(fraction * len(clips))))]:
        clips[i].held_out = True


def recorded_clips(metadata: dict[str, Any], labels: tuple[str, ...], rate: int, mix: MixConfig,
                   log=print) -> dict[str, list[UserClip]]:
    """The clips an earlier ``train.teach`` recorded in a checkpoint's metadata for ``labels`` (its
    taught classes, and the old-class clips it carried), {label: clips} in ``labels`` order, each
    clip held out if it was recorded so. A clip
    whose file is gone or changed (sha256) is left out, with a line saying so: the class is then
    held by distillation on whatever else sounds in the scenes."""
    taught = metadata.get("taught") or {}
    earlier = (metadata.get("taught_from_metadata") or {}).get("taught") or {}
    rows = list(taught.get("clips", [])) + list(taught.get("old_class_clips", [])) + list(earlier.get("clips", []))
    found: dict[str, dict[str, Path]] = {}
    held_out: set[str] = set()  # sha256 of the clips recorded as held out (never trained on)
    missing = 0
    for row in rows:
        label, path = row.get("class"), Path(str(row.get("path", "")))
        if label not in labels or row.get("sha256") in found.get(label, {}):
            continue
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == row.get("sha256"):
            found.setdefault(label, {})[row["sha256"]] = path
            if row.get("split") == "held_out":
                held_out.add(row["sha256"])
        else:
            missing += 1
    if missing:
        log(f"{missing} recorded clip(s) of the old classes are missing or changed on disk: left out")
    out: dict[str, list[UserClip]] = {}
    for label in labels:
        if label in found:
            try:
                out[label] = load_clips(sorted(found[label].values()), label, rate, mix)
                for clip in out[label]:
                    clip.held_out = clip.sha256 in held_out
            except TeachError as exc:
                log(f"old class {label}: its recorded clips are left out ({exc})")
    return out


class ClipStore:
    """train.mixing's Store over the user's decoded clips, and a pool store (MemoryStore) for
    world and distractor clips."""

    def __init__(self, rate: int, clips: list[UserClip], pool_store=None):
        self.rate = rate
        self._clips = {c.path: c for c in clips}
        self._pool = pool_store

    def get(self, clip: Clip) -> tuple[np.ndarray, list[tuple[int, int]]]:
        user = self._clips.get(clip.path)
        if user is not None:
            return user.audio.copy(), list(user.segments)
        return self._pool.get(clip)

    def piece(self, clip: Clip, rng: np.random.Generator, max_len: int) -> np.ndarray:
        if clip.path in self._clips:
            x = self._clips[clip.path].audio
            start = excerpt_start(rng, len(x), max_len)
            return x[start:start + max_len].copy()
        return self._pool.piece(clip, rng, max_len)


# ------------------------------------------------------------------------------------- scenes


@dataclass
class SceneSource:
    """What one split's scenes are mixed from, and how."""

    mix: MixConfig
    store: ClipStore
    pools: ScenePools
    augmenter: Any = None
    noise_db: tuple[float, float] = (-70.0, -45.0)

    def scene(self, rng: np.random.Generator):
        # A generated noise bed of a drawn colour and level under every scene: the world a user's
        # clips are heard in when no world pool is given, and variety when one is.
        colour = NOISES[int(rng.integers(len(NOISES)))]
        mix = self.mix.replace(noise=colour, noise_db=float(rng.uniform(*self.noise_db)))
        return mix_scene(rng, mix, self.store, self.pools, self.augmenter)


def scene_features(source: SceneSource, rng: np.random.Generator, logmel: LogMel, hop_s: float,
                   columns: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, list[Event]]:
    """One scene: log-mel (T, F), targets (T, len(columns)) for ``columns`` (new classes, then
    NEGATIVE), and its labelled events (seconds)."""
    scene = source.scene(rng)
    with torch.no_grad():
        feats = logmel(torch.from_numpy(scene.audio.astype(np.float32))).numpy()
    rate = source.mix.sample_rate_hz
    events = [Event("scene", a / rate, b / rate, label) for label, a, b in scene.labelled]
    return feats, events_to_frame_targets(events, feats.shape[0], hop_s, columns), events


# --------------------------------------------------------------------------------------- head


@dataclass
class FrameBank:
    """Cached frames: embeddings (N, D) float16, new-class targets (N, K), negative flags (N,),
    old-class positives (N, C_old) (frames inside a recorded clip of an old class), weights (N,)
    (a kept background frame stands for ``background_every`` frames)."""

    embeddings: torch.Tensor
    targets: torch.Tensor
    negative: torch.Tensor
    old_positive: torch.Tensor
    weights: torch.Tensor


CHUNK_FRAMES = 2048  # frames per float16 -> float32 slice: bounds the float32 copy (2048 x D) in memory


def _embedding_scale(bank: FrameBank) -> float:
    """Mean squared embedding norm over the frames divided by D: the average eigenvalue of the frames'
    second-moment matrix, what the L2 strengths are relative to (so they mean the same for any trunk)."""
    n, d = bank.embeddings.shape
    total = sum(float(bank.embeddings[s:s + CHUNK_FRAMES].float().pow(2).sum()) for s in range(0, n, CHUNK_FRAMES))
    return max(total / (n * d), 1e-12)


def _old_targets(bank: FrameBank, w_old: torch.Tensor, b_old: torch.Tensor) -> torch.Tensor:
    """Distillation targets of the old rows (N, C_old): the original rows' own probability on every
    frame, except on a negative's frames, where a class is 1 only if one of its recorded clips sounds
    there too (the negative says nothing of this detector's classes should fire), else 0."""
    parts = []
    for s in range(0, bank.embeddings.shape[0], CHUNK_FRAMES):
        parts.append(torch.sigmoid(F.linear(bank.embeddings[s:s + CHUNK_FRAMES].float(), w_old, b_old)))
    teacher = torch.cat(parts)
    negative = bank.negative[:, None] > 0
    return torch.where(bank.old_positive, 1.0, torch.where(negative, 0.0, teacher))


def _balanced_weights(bank: FrameBank) -> torch.Tensor:
    """Frame weights (N, C_old) for the old rows' loss, each column summing to 1: for each old class,
    negative frames, that class's own recorded-clip frames and the rest each weigh a third (half when a
    group is absent), so a few seconds of negatives neither drown nor are drowned by the class's own
    sound or the scenes around them. ``bank.weights`` (N,) weighs frames within a group."""
    negative = bank.negative > 0
    out = torch.zeros(bank.weights.shape[0], bank.old_positive.shape[1])
    for c in range(out.shape[1]):
        positive = bank.old_positive[:, c] & ~negative
        groups = [g for g in (negative, positive, ~negative & ~positive) if float(bank.weights[g].sum()) > 0]
        for g in groups:
            out[g, c] = bank.weights[g] / bank.weights[g].sum() / len(groups)
    return out


class _EarlyStop(Exception):
    """The held-out loss stopped improving."""


class _HeadLoss:
    """The head's objective and its gradient, computed in float32 over float16 chunks of a bank, with
    no autograd graph (the gradient of a weighted BCE of a linear map is closed-form).

    Rows are [old rows (only when trained), new rows]; ``targets`` (N, rows) and ``frame_weights``
    (N, rows) give each row's target and weight per frame."""

    def __init__(self, embeddings: torch.Tensor, targets: torch.Tensor, frame_weights: torch.Tensor):
        self.embeddings, self.targets, self.frame_weights = embeddings, targets, frame_weights
        # One float32 slice reused for every chunk of every pass: a fresh 2048 x D allocation per
        # chunk costs page faults (system time) comparable to the arithmetic.
        self._slice = torch.empty(min(CHUNK_FRAMES, embeddings.shape[0]), embeddings.shape[1])

    def __call__(self, w: torch.Tensor, b: torch.Tensor, grad: bool = True):
        loss = torch.zeros((), dtype=torch.float64)
        gw, gb = (torch.zeros_like(w), torch.zeros_like(b)) if grad else (None, None)
        for s in range(0, self.embeddings.shape[0], CHUNK_FRAMES):
            part = self.embeddings[s:s + CHUNK_FRAMES]
            e = self._slice[:part.shape[0]]
            e.copy_(part)
            z = F.linear(e, w, b)
            t, fw = self.targets[s:s + CHUNK_FRAMES], self.frame_weights[s:s + CHUNK_FRAMES]
            loss += float((F.binary_cross_entropy_with_logits(z, t, reduction="none") * fw).sum())
            if grad:
                r = (torch.sigmoid(z) - t) * fw  # d loss / d z
                gw.addmm_(r.T, e)
                gb += r.sum(dim=0)
        return loss, gw, gb


def fit_head(bank: FrameBank, w_old: torch.Tensor, b_old: torch.Tensor, n_new: int, cfg: TeachConfig,
             train_old: bool, held: FrameBank | None = None, progress=None
             ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The classifier (C_old + n_new, D) weight and bias fitted on ``bank`` by full-batch L-BFGS
    (a convex problem: a few dozen passes over the cached frames, each a pair of (N, D) x (D, C)
    products, instead of thousands of small steps).

    New rows: weighted BCE on their targets + ``cfg.new_l2`` x scale x ||w||^2 / 2. Old rows (only
    when ``train_old``): weighted BCE toward the original rows' probabilities (0 on negatives, see
    ``_old_targets``) with negatives, old-class frames and the rest balanced (``_balanced_weights``),
    + ``cfg.old_l2`` x scale x ||w - w_original||^2 / 2 (L2-SP: the pull toward the original
    weights). scale = ``_embedding_scale``. With ``held`` (frames of the held-out clips' scenes),
    the step whose held-out loss of the new rows is lowest is kept, and fitting stops after
    ``cfg.patience`` steps without improvement. Returns (weight, bias, objective per step)."""
    n, d = bank.embeddings.shape
    n_old = w_old.shape[0]
    scale = _embedding_scale(bank)
    new_weights = (bank.weights / bank.weights.sum())[:, None].expand(n, n_new)
    if train_old:
        targets = torch.cat([_old_targets(bank, w_old, b_old), bank.targets], dim=1)
        frame_weights = torch.cat([_balanced_weights(bank), new_weights], dim=1)
        w0, b0 = torch.cat([w_old, torch.zeros(n_new, d)]), torch.cat([b_old, torch.full((n_new,), -3.0)])
    else:
        targets, frame_weights = bank.targets, new_weights
        w0, b0 = torch.zeros(n_new, d), torch.full((n_new,), -3.0)  # events are rare: start near "off"
    objective = _HeadLoss(bank.embeddings, targets.float(), frame_weights.contiguous())
    rows_old = n_old if train_old else 0
    l2 = torch.full((w0.shape[0], 1), cfg.new_l2 * scale)
    l2[:rows_old] = cfg.old_l2 * scale
    anchor = torch.zeros_like(w0)
    if rows_old:
        anchor[:rows_old] = w_old

    held_objective = None
    if held is not None and n_new:
        held_w = (held.weights / held.weights.sum())[:, None].expand(-1, n_new).contiguous()
        held_objective = _HeadLoss(held.embeddings, held.targets.float(), held_w)
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    best = {"held": float("inf"), "w": w0, "b": b0, "since": 0}
    history: list[float] = []

    def closure():
        # Called once per pass over the frames (L-BFGS's line search included): each call is a
        # candidate point, scored on the held-out frames for early stopping.
        with torch.no_grad():
            loss, gw, gb = objective(w, b)
            delta = w - anchor
            loss += float((l2 * delta.pow(2)).sum()) / 2
            w.grad, b.grad = gw + l2 * delta, gb
            history.append(float(loss))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{history[-1]:.4f}", refresh=False)
            if held_objective is not None:
                value = held_objective(w[rows_old:], b[rows_old:], grad=False)[0]
                if value < best["held"]:
                    best.update(held=float(value), w=w.detach().clone(), b=b.detach().clone(), since=0)
                else:
                    best["since"] += 1
                    if best["since"] >= cfg.patience:
                        raise _EarlyStop
        return torch.tensor(float(loss))

    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=cfg.head_steps, max_eval=cfg.head_steps, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-9)
    try:
        optimizer.step(closure)
    except _EarlyStop:
        pass
    weight, bias = (best["w"], best["b"]) if held_objective is not None else (w.detach(), b.detach())
    if not train_old:
        weight, bias = torch.cat([w_old, weight]), torch.cat([b_old, bias])
    return weight, bias, history


@dataclass
class SceneBank:
    """Whole training scenes for adapting the last block: CNN outputs h (S, C, T, 1) (the input of
    ``model.temporal``), per-row targets (S, T, rows) and per-row frame weights (S, T, rows), each
    row's weights summing to 1 over all scenes."""

    cnn: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor


def adapt_last_block(student: SEDModel, scenes: SceneBank, cfg: TeachConfig, progress=None) -> list[float]:
    """Adapt ``student.temporal`` (the last block, f_dil or the GRU; BatchNorm on its running
    statistics) and its classifier in place on ``scenes`` by Adam: weighted BCE on the targets plus
    ``cfg.adapt_l2`` x the squared distance of every adapted tensor to its starting value (L2-SP:
    the block moves only as far as the negatives need). Frozen-trunk head rows alone cannot pull
    apart a negative that the trunk maps near a class (a whistle near a beep); one block more can.
    Returns the mean loss per epoch."""
    params = list(student.temporal.parameters()) + list(student.classifier.parameters())
    anchors = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=cfg.adapt_lr)
    n = scenes.cnn.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    student.eval()  # BatchNorm keeps the running statistics the old classes were calibrated on
    for _epoch in range(cfg.adapt_epochs):
        total = 0.0
        for idx in torch.randperm(n, generator=gen).split(cfg.adapt_batch_scenes):
            optimizer.zero_grad(set_to_none=True)
            z = student.classifier(student.temporal(scenes.cnn[idx]))
            fit = (F.binary_cross_entropy_with_logits(z, scenes.targets[idx], reduction="none")
                   * scenes.weights[idx]).sum() * (n / len(idx))
            pull = sum((p - a).pow(2).sum() for p, a in zip(params, anchors))
            loss = fit + cfg.adapt_l2 * pull
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx) / n
        history.append(total)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{total:.4f}", refresh=False)
    return history


# ------------------------------------------------------------------------------------ teaching


@dataclass
class TeachResult:
    path: Path
    labels: tuple[str, ...]
    new_labels: tuple[str, ...]
    validation: list[dict[str, Any]]
    negatives_before: int
    negatives_after: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def _new_model(teacher: Checkpoint, new_labels: tuple[str, ...]) -> tuple[SEDModel, DetectorConfig]:
    config = teacher.config
    labels = tuple(config.labels) + new_labels
    model_config = config.model.replace(n_classes=len(labels))
    model = SEDModel(model_config)
    state = {k: v for k, v in teacher.model.state_dict().items() if not k.startswith("classifier.")}
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert sorted(missing) == ["classifier.bias", "classifier.weight"], missing
    decoder = _merged_decoder(config.decoder, len(config.labels), None, len(new_labels))
    return model.eval(), config.replace(model=model_config, labels=labels, decoder=decoder)


def _merged_decoder(old: DecoderConfig, n_old: int, new: DecoderConfig | None, n_new: int) -> DecoderConfig:
    """Old classes keep their decoder; the new classes take ``new`` (or the defaults)."""
    on_old, off_old = old.thresholds(n_old)
    new = new or DecoderConfig()
    on_new, off_new = new.thresholds(n_new)
    return DecoderConfig(
        on_thresholds=on_old + on_new, off_thresholds=off_old + off_new,
        min_event_s=old.per_class("min_event_s", n_old) + new.per_class("min_event_s", n_new),
        min_gap_s=old.per_class("min_gap_s", n_old) + new.per_class("min_gap_s", n_new),
        smoothing_frames=old.per_class("smoothing_frames", n_old) + new.per_class("smoothing_frames", n_new))


@dataclass(frozen=True)
class ValidationFile:
    """A validation scene as train.tune reads it: probs and targets (T, K), reference events."""

    probs: np.ndarray
    targets: np.ndarray
    events: tuple[Event, ...]


def _through_trunk(trunk: SEDModel, feats: np.ndarray | torch.Tensor,
                   normalization: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One scene's un-normalised log-mel (T, F) through the frozen trunk: (h (1, C, T, 1), the CNN's
    output and ``model.temporal``'s input; e (T, D), the frame embeddings the classifier reads)."""
    mean, std = normalization
    x = torch.as_tensor(feats)
    with torch.no_grad():
        h = trunk.features(((x - mean) / std)[None])
        return h, trunk.temporal(h)[0]


@dataclass(frozen=True)
class CheckScene:
    """A scene of old classes' held-out clips: the frozen CNN's output h (1, C, T, 1) (the input of
    ``model.temporal``) and the reference frames (T, len(labels)) of the checked classes."""

    cnn: torch.Tensor
    reference: np.ndarray


def _old_check_scenes(source: SceneSource, cfg: TeachConfig, logmel: LogMel, hop_s: float, labels: tuple[str, ...],
                      normalization: tuple[torch.Tensor, torch.Tensor], trunk: SEDModel) -> list[CheckScene]:
    """``cfg.check_scenes`` scenes mixed from ``source`` (the old classes' held-out clips), through the frozen
    CNN: a few held-out clips in many placements, levels and noise beds, so that one lucky or unlucky
    event does not decide a class."""
    mean, std = normalization
    out = []
    for i in range(cfg.check_scenes):
        feats, targets, _ = scene_features(source, np.random.default_rng([cfg.seed, 4, i]), logmel, hop_s, labels)
        with torch.no_grad():
            h = trunk.features(((torch.from_numpy(feats) - mean) / std)[None])
        out.append(CheckScene(h, targets > 0))
    return out


def _check_embeddings(model: SEDModel, scenes: list[CheckScene]) -> list[torch.Tensor]:
    """The last block's output (T, D) on every check scene: what the classifier rows read."""
    with torch.no_grad():
        return [model.temporal(scene.cnn)[0] for scene in scenes]


def _old_class_f1(embeddings: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, config: DetectorConfig,
                  scenes: list[CheckScene], labels: tuple[str, ...]) -> dict[str, float]:
    """Frame F1 of each of ``labels`` (old classes) over ``scenes`` pooled, for the classifier
    (``weight``, ``bias``) on ``embeddings`` (``_check_embeddings``): the events its own decoder
    (``config.decoder``) reports, as frames, against the reference frames. The decoder is part of the
    score: a class whose probabilities shift under thresholds tuned for the original loses events."""
    hop = config.frontend.hop_s
    counts = {label: np.zeros(3) for label in labels}  # tp, fp, fn
    for e, scene in zip(embeddings, scenes):
        with torch.no_grad():
            probs = torch.sigmoid(F.linear(e, weight, bias)).numpy()
        decoded = decode_offline(probs, config.labels, hop, config.decoder)
        for k, label in enumerate(labels):
            ref = scene.reference[:, k]
            est = np.zeros_like(ref)
            for e in decoded:
                if e.label == label:
                    est[round(e.onset_s / hop):round(e.offset_s / hop)] = True
            counts[label] += (np.sum(ref & est), np.sum(~ref & est), np.sum(ref & ~est))
    return {label: float(2 * tp / max(2 * tp + fp + fn, 1)) for label, (tp, fp, fn) in counts.items()}


def _count_old_events(checkpoint: Checkpoint | tuple, clips: list[UserClip], logmel: LogMel) -> int:
    """Events of the old classes the detector reports on the negative clips, each run whole."""
    model, config, n_old = checkpoint
    mean = torch.tensor(config.normalization.mean) if config.normalization else 0.0
    std = torch.tensor(config.normalization.std) if config.normalization else 1.0
    count = 0
    for clip in clips:
        feats = logmel(torch.from_numpy(clip.audio.astype(np.float32)))
        if feats.shape[0] == 0:
            continue
        with torch.no_grad():
            probs = torch.sigmoid(model(((feats - mean) / std)[None])[0]).numpy()
        labels = config.labels
        count += sum(1 for e in decode_offline(probs, labels, config.frontend.hop_s, config.decoder)
                     if labels.index(e.label) < n_old)
    return count


def teach(source_model: str | Path, additions: dict[str, str | Path], out: str | Path, *,
          negatives: list[str | Path] = (), extents: dict[str, str | Path] | None = None,
          world: list[str | Path] = (), distractors: str | Path | None = None,
          cfg: TeachConfig = TeachConfig(), progress: bool = True, log=print, command: str = "") -> TeachResult:
    """Teach ``additions`` ({new label: folder of clips}) and/or ``negatives`` (folders of
    recordings of what the detector wrongly fires on) to ``source_model``; write ``out``
    (checkpoint) and ``out``.md (model card). See the module docstring."""
    from tqdm import tqdm

    started, cpu_started = time.perf_counter(), time.process_time()
    extents = dict(extents or {})
    # ---- check everything before any compute
    try:
        teacher = load_checkpoint(resolve_model(source_model))
    except (CheckpointError, ModelNotFoundError) as exc:
        raise TeachError(f"--from: {exc}") from None
    if not additions and not negatives:
        raise TeachError("nothing to teach: give --add LABEL=FOLDER (a new class from its clips) and/or "
                         "--negatives FOLDER (recordings the detector wrongly fires on)")
    old_labels = tuple(teacher.config.labels)
    for label in additions:
        if not _LABEL.match(label):
            raise TeachError(f"--add {label}=...: a label is letters, digits, '_', '.' or '-', starting with a "
                             "letter or digit (it goes into TSV and JSON output)")
        if label in old_labels:
            raise TeachError(f"--add {label}: the detector {source_model} already has a class {label!r} (its classes: "
                             f"{', '.join(old_labels)}); choose another name, or teach it with --negatives "
                             "to correct that class")
    unknown = sorted(set(extents) - set(additions))
    if unknown:
        raise TeachError(f"--extents {unknown[0]}=...: no --add {unknown[0]}=FOLDER to go with it")
    out = Path(out)
    if out.suffix != ".pt":
        raise TeachError(f"--out {out}: name the checkpoint with a .pt suffix (the model card goes beside it as .md)")
    frontend = teacher.config.frontend
    rate, hop_s = frontend.sample_rate_hz, frontend.hop_s
    from train.augment import AugmentConfig, WaveAugmenter
    from train.onthefly import scene_seconds

    mix = MixConfig(scene_s=scene_seconds(frontend, cfg.scene_frames), sample_rate_hz=rate,
                    events_per_minute_range=cfg.events_per_minute,
                    augment=AugmentConfig() if cfg.augment else None)
    new_labels = tuple(additions)
    user: dict[str, list[UserClip]] = {}
    for label, folder in additions.items():
        files = audio_files(folder, f"--add {label}=")
        if len(files) < MIN_CLIPS:
            raise TeachError(f"--add {label}={folder}: {len(files)} clip(s); a class needs at least {MIN_CLIPS} "
                             f"(some are held out to check it): record {MIN_CLIPS - len(files)} more")
        table = read_extents(extents[label]) if label in extents else None
        user[label] = load_clips(files, label, rate, mix, table, str(extents.get(label, "")))
        hold_out(user[label], cfg.held_out, cfg.seed)
    negative_clips = [c for folder in negatives
                      for c in load_clips(audio_files(folder, "--negatives"), NEGATIVE, rate, mix)]
    # With negatives the old rows move: the old classes' recorded clips sound in the training scenes so
    # that distillation holds them where they sound, not only where nothing does.
    old_clips = recorded_clips(teacher.metadata, old_labels, rate, mix, log) if negative_clips else {}
    for clips in old_clips.values():
        if len(clips) >= 2 and not any(c.held_out for c in clips):
            hold_out(clips, cfg.held_out, cfg.seed)
    # Old classes whose held-out clips can check them: each must score on scenes of those clips at
    # least what it scored before, or its changes are undone (see the old-class check below).
    checked_old = tuple(label for label, clips in old_clips.items() if any(c.held_out for c in clips))
    out.parent.mkdir(parents=True, exist_ok=True)

    # ---- pools: the user's clips, world pools (groups held out for validation), distractors
    from train.pools import MemoryStore, load_pool, load_world, split_world, subset_by_minutes

    pool_rng = np.random.default_rng([cfg.seed, 1])
    try:
        world_train, world_held = split_world(load_world(list(map(str, world)))) if world else ([], [])
        world_train = subset_by_minutes(world_train, cfg.world_minutes, pool_rng)
        world_held = subset_by_minutes(world_held, cfg.world_minutes / 4, pool_rng)
        distractor_clips = load_pool(distractors) if distractors else []
        pool_store = MemoryStore(world_train + world_held + distractor_clips, rate, mix.label_db, mix.min_gap_s)
    except MixError as exc:
        raise TeachError(f"--world/--distractors: {exc}") from None
    store = ClipStore(rate, [c for cs in list(user.values()) + list(old_clips.values()) for c in cs] + negative_clips,
                      pool_store)
    distractor_clips = [c for c in distractor_clips if c in pool_store]

    def pools(held: bool) -> ScenePools:
        events = {label: [c.clip(i) for i, c in enumerate(cs) if c.held_out == held] for label, cs in user.items()}
        if negative_clips:
            events[NEGATIVE] = [c.clip(i) for i, c in enumerate(negative_clips)]
        if not held:
            events.update({label: [c.clip(i) for i, c in enumerate(cs) if not c.held_out] for label, cs in old_clips.items()})
        events = {label: clips for label, clips in events.items() if clips}
        return ScenePools(events, {}, distractor_clips, world_by_category(world_held if held else world_train), ())

    def world_by_category(chosen) -> dict:
        """The world clips of ``chosen`` that the pool store holds, by category (speech, music,
        ambience), the empty categories left out."""
        by_category = {k: [c for c in chosen if c.label == k and c in pool_store] for k in ("speech", "music", "ambience")}
        return {k: v for k, v in by_category.items() if v}

    def old_check_pools() -> ScenePools:
        """The old classes' held-out clips alone, over the held-out world: where each class must still sound."""
        events = {label: [c.clip(i) for i, c in enumerate(old_clips[label]) if c.held_out] for label in checked_old}
        return ScenePools(events, {}, distractor_clips, world_by_category(world_held), ())

    augmenter = WaveAugmenter(mix.augment, rate) if mix.augment is not None else None
    train_source = SceneSource(mix, store, pools(False), augmenter, cfg.noise_db)
    kept_old = tuple(old_clips)
    columns = new_labels + kept_old + (NEGATIVE,)
    logmel = LogMel(frontend)
    norm = teacher.config.normalization
    mean = torch.tensor(norm.mean if norm else [0.0] * frontend.n_mels)
    std = torch.tensor(norm.std if norm else [1.0] * frontend.n_mels)
    trunk = teacher.model.eval()
    n_old = len(old_labels)
    log(f"teaching {source_model} ({n_old} classes) "
        + (f"new: {', '.join(f'{k} ({sum(not c.held_out for c in v)} clips, {sum(c.held_out for c in v)} held out)' for k, v in user.items())}" if user else "no new class")
        + f"; negatives: {len(negative_clips)} clips"
        + (f" (old classes sounding in the scenes by their recorded clips: {', '.join(f'{k} ({len(v)})' for k, v in old_clips.items())})"
           if old_clips else "")
        + f"; world: {len(world_train)} clips; "
          f"{cfg.scenes} scenes of {mix.scene_s:.2f} s")

    # ---- training frames: mix, log-mel, frozen trunk, keep labelled frames and every n-th other
    timings = {"mix_s": 0.0, "trunk_s": 0.0}
    chunks: list[tuple[torch.Tensor, ...]] = []
    old_columns = [old_labels.index(label) for label in kept_old]
    adapt: list[tuple[torch.Tensor, ...]] = []
    bar = tqdm(total=cfg.scenes, desc="scenes through the frozen trunk", disable=not progress, leave=False,
               dynamic_ncols=True)
    for i in range(cfg.scenes):
        t0 = time.perf_counter()
        feats, targets, _ = scene_features(train_source, np.random.default_rng([cfg.seed, 2, i]), logmel, hop_s, columns)
        t1 = time.perf_counter()
        h, e = _through_trunk(trunk, feats, (mean, std))
        if negative_clips:  # whole scenes for adapting the last block: the CNN output and the teacher's own view
            with torch.no_grad():
                p = torch.sigmoid(trunk.classifier(e))
            negative = torch.from_numpy(targets[:, -1] > 0)
            positive = torch.zeros(len(targets), n_old, dtype=torch.bool)
            positive[:, old_columns] = torch.from_numpy(targets[:, len(new_labels):-1] > 0)
            adapt.append((h[0], torch.where(positive, 1.0, torch.where(negative[:, None], 0.0, p)),
                          torch.from_numpy(targets[:, :len(new_labels)]), negative, positive, torch.ones(len(p), dtype=torch.bool)))
        timings["mix_s"] += t1 - t0
        timings["trunk_s"] += time.perf_counter() - t1
        labelled = targets.any(axis=1)
        keep = labelled | (np.arange(len(targets)) % cfg.background_every == i % cfg.background_every)
        idx = torch.from_numpy(np.flatnonzero(keep))
        weights = torch.from_numpy(np.where(labelled[keep], 1.0, float(cfg.background_every)).astype(np.float32))
        t = torch.from_numpy(targets[keep])
        old_positive = torch.zeros(len(idx), n_old, dtype=torch.bool)
        old_positive[:, old_columns] = t[:, len(new_labels):-1] > 0
        chunks.append((e[idx].half(), t[:, :len(new_labels)], t[:, -1], old_positive, weights))
        bar.update(1)
    bar.close()
    # The negatives as recorded, every frame of each, besides mixed into scenes: a false alarm is
    # heard on the recording as it is (its own edges, level and silence), and there every old class
    # should be off.
    for clip in negative_clips:
        feats = logmel(torch.from_numpy(clip.audio.astype(np.float32)))
        k = feats.shape[0]
        if k == 0:
            continue
        h, e = _through_trunk(trunk, feats, (mean, std))
        with torch.no_grad():
            p = torch.sigmoid(trunk.classifier(e))
        negative = torch.full((k,), clip.label == NEGATIVE)
        positive = torch.zeros(k, n_old, dtype=torch.bool)
        if clip.label != NEGATIVE:
            events = [Event("clip", a / rate, b / rate, clip.label) for a, b in clip.segments]
            positive[:, old_labels.index(clip.label)] = torch.from_numpy(
                events_to_frame_targets(events, k, hop_s, (clip.label,))[:, 0] > 0)
        old_target = torch.where(positive, 1.0, torch.where(negative[:, None], 0.0, p))
        # Into the adaptation scenes too, cut to the scene length and zero-padded (the zeros the
        # offline forward pads with anyway), the padding weighted 0.
        for a in range(0, k, cfg.scene_frames):
            m = min(cfg.scene_frames, k - a)
            pad = (0, cfg.scene_frames - m)
            valid = torch.arange(cfg.scene_frames) < m
            adapt.append((F.pad(h[0, :, a:a + m], (0, 0) + pad), F.pad(old_target[a:a + m], (0, 0) + pad),
                          torch.zeros(cfg.scene_frames, len(new_labels)), F.pad(negative[a:a + m], pad),
                          F.pad(positive[a:a + m], (0, 0) + pad), valid))
        chunks.append((e.half(), torch.zeros(k, len(new_labels)), negative.float(), positive, torch.ones(k)))
    bank = FrameBank(*(torch.cat(parts) for parts in zip(*chunks)))
    del chunks
    if not torch.isfinite(bank.embeddings).all():
        raise TeachError(f"--from {source_model}: its trunk's embeddings overflow float16 on these scenes; "
                         "this detector cannot be taught with train.teach")
    # ---- validation scenes from the held-out clips: early stopping of the head fit, then the new
    # classes' decoders
    held, val_events = None, []
    if new_labels:
        t0 = time.perf_counter()
        val_source = SceneSource(mix.replace(augment=None), store, pools(True), None, cfg.noise_db)
        val_chunks = []
        for i in range(cfg.val_scenes):
            feats, targets, events = scene_features(val_source, np.random.default_rng([cfg.seed, 3, i]), logmel,
                                                    hop_s, columns)
            h, e = _through_trunk(trunk, feats, (mean, std))
            val_chunks.append(e.half())
            val_events.append((h, torch.from_numpy(targets[:, :len(new_labels)]),
                               tuple(ev for ev in events if ev.event_label in new_labels)))
        embeddings = torch.cat(val_chunks)
        held = FrameBank(embeddings, torch.cat([t for _, t, _ in val_events]), torch.zeros(len(embeddings)),
                         torch.zeros(len(embeddings), n_old, dtype=torch.bool), torch.ones(len(embeddings)))
        timings["validation_s"] = time.perf_counter() - t0

    t0, cpu0 = time.perf_counter(), time.process_time()
    bar = tqdm(total=cfg.head_steps, desc="fitting the head (L-BFGS passes)", disable=not progress, leave=False,
               dynamic_ncols=True)
    weight, bias, history = fit_head(bank, teacher.model.classifier.weight.detach(),
                                     teacher.model.classifier.bias.detach(), len(new_labels), cfg,
                                     train_old=bool(negative_clips), held=held, progress=bar)
    bar.close()
    timings["head_s"] = time.perf_counter() - t0
    timings["head_cpu_s"] = time.process_time() - cpu0
    log(f"head fitted in {len(history)} passes: {timings['head_s']:.1f} s wall, {timings['head_cpu_s']:.1f} s CPU")
    frames = int(bank.embeddings.shape[0])
    del bank

    student, config = _new_model(teacher, new_labels)
    with torch.no_grad():
        student.classifier.weight.copy_(weight)
        student.classifier.bias.copy_(bias)

    # ---- the old-class check: each old class with held-out clips scored (frame F1, its own decoder)
    # on scenes of those clips, before and after. A head row that scores less than the original is
    # put back as it was (exact: the trunk is frozen); the adapted block is kept only if no checked
    # class scores less with it than before. Distillation alone cannot promise this: where the trunk
    # maps a negative near a class, the row that silences the negative also loses the class.
    checks = _old_check_scenes(SceneSource(mix.replace(augment=None), store, old_check_pools(), None, cfg.noise_db),
                               cfg, logmel, hop_s, checked_old, (mean, std), trunk) if checked_old else []
    old_check: dict[str, dict[str, Any]] = {}
    if checks:
        embeddings = _check_embeddings(trunk, checks)
        w_teacher = teacher.model.classifier.weight.detach()
        b_teacher = teacher.model.classifier.bias.detach()
        before_f1 = _old_class_f1(embeddings, w_teacher, b_teacher, teacher.config, checks, checked_old)
        head_f1 = _old_class_f1(embeddings, weight, bias, config, checks, checked_old)
        for label in checked_old:
            c = old_labels.index(label)
            old_check[label] = {"before": round(before_f1[label], 4), "head": round(head_f1[label], 4), "share": 1.0}
            # A row that loses its class goes back toward the original along the line between them
            # (its logits move linearly): the largest share of the change that still holds the
            # class keeps what it can of the negatives' effect; share 0 is the original row.
            fitted_w, fitted_b = weight[c].clone(), bias[c].clone()
            for share in TAUGHT_SHARES:
                if head_f1[label] >= before_f1[label] - cfg.hold_tolerance:
                    break
                with torch.no_grad():
                    weight[c] = w_teacher[c] + share * (fitted_w - w_teacher[c])
                    bias[c] = b_teacher[c] + share * (fitted_b - b_teacher[c])
                old_check[label]["share"] = share
                head_f1[label] = _old_class_f1(embeddings, weight, bias, config, checks, (label,))[label]
            if head_f1[label] < before_f1[label] - cfg.hold_tolerance:
                with torch.no_grad():
                    weight[c], bias[c] = w_teacher[c], b_teacher[c]
                old_check[label]["share"] = 0.0
                head_f1[label] = before_f1[label]
            old_check[label]["kept"] = round(head_f1[label], 4)
        del embeddings
        with torch.no_grad():
            student.classifier.weight.copy_(weight)
            student.classifier.bias.copy_(bias)
    held_back = [f"{label} ({row['share']:g} of its change)" for label, row in old_check.items() if row["share"] < 1]
    if held_back:
        # A row held back reproduces its check only on the original last block: adapting the block
        # for the other rows' sake moves what the row reads (measured: a restored class distilled
        # toward the original everywhere still lost frame F1 on unseen scenes), so the block stays.
        log(f"old class(es) scoring less on their held-out clips after teaching the negatives keep part of the "
            f"change: {', '.join(held_back)}; the last block is not adapted (what is left of these classes' "
            "false alarms stays)")
        adapt = []

    adapt_history: list[float] = []
    if adapt:
        t0 = time.perf_counter()
        cnn, old_t, new_t, negative, positive, valid = (torch.stack(parts) for parts in zip(*adapt))
        del adapt
        head_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        s_, t_ = negative.shape
        flat = FrameBank(torch.empty(0), torch.empty(0), negative.reshape(-1).float(), positive.reshape(s_ * t_, n_old),
                         valid.reshape(-1).float())
        old_w = _balanced_weights(flat).reshape(s_, t_, n_old)
        new_w = (valid.float() / valid.sum())[:, :, None].expand(s_, t_, len(new_labels))
        scenes = SceneBank(cnn, torch.cat([old_t, new_t], dim=2), torch.cat([old_w, new_w], dim=2).contiguous())
        bar = tqdm(total=cfg.adapt_epochs, desc="adapting the last block", disable=not progress, leave=False,
                   dynamic_ncols=True)
        adapt_history = adapt_last_block(student, scenes, cfg, progress=bar)
        bar.close()
        del scenes, cnn
        if checks:
            adapted_f1 = _old_class_f1(_check_embeddings(student, checks), student.classifier.weight.detach(),
                                       student.classifier.bias.detach(), config, checks, checked_old)
            worse = [label for label in checked_old
                     if adapted_f1[label] < before_f1[label] - cfg.hold_tolerance]
            for label in checked_old:
                old_check[label]["adapted"] = round(adapted_f1[label], 4)
            if worse:
                log(f"adapting the last block lowered {', '.join(worse)} on their held-out clips: it is undone")
                student.load_state_dict(head_state)
                adapt_history = []
        del head_state
        timings["adapt_s"] = time.perf_counter() - t0
        with torch.no_grad():
            weight, bias = student.classifier.weight.detach().clone(), student.classifier.bias.detach().clone()

    validation, tuned = [], None
    if new_labels:
        t0 = time.perf_counter()
        files = []
        for h, targets, events in val_events:  # the student's own last block: adapted with negatives
            with torch.no_grad():
                probs = torch.sigmoid(student.classifier(student.temporal(h))[0, :, n_old:]).numpy()
            files.append(ValidationFile(probs, targets.numpy(), events))
        tuned, validation = tune_decoder(files, hop_s, new_labels,
                                         max_smoothing_s=default_max_smoothing_s(student.lookahead_frames))
        timings["validation_s"] += time.perf_counter() - t0
        del held
    config = config.replace(decoder=_merged_decoder(teacher.config.decoder, n_old, tuned, len(new_labels)))

    before = after = 0
    if negative_clips:
        before = _count_old_events((teacher.model, teacher.config, n_old), negative_clips, logmel)
        after = _count_old_events((student, config, n_old), negative_clips, logmel)

    seconds = time.perf_counter() - started
    timings["cpu_s"] = time.process_time() - cpu_started  # this process's CPU time, all threads
    metadata = {
        "taught": {
            "from": str(source_model), "from_content_sha256": _content_sha(teacher),
            "new_classes": list(new_labels),
            "clips": [c.record(rate) for cs in user.values() for c in cs],
            "negatives": [c.record(rate) for c in negative_clips],
            "old_class_clips": [c.record(rate) for cs in old_clips.values() for c in cs],
            "world": [str(w) for w in world], "distractors": str(distractors) if distractors else None,
            "settings": asdict(cfg), "training_frames": frames, "head_loss": history, "adapt_loss": adapt_history,
            "validation": validation, "negative_events_before": before, "negative_events_after": after,
            "old_class_check": old_check,
            "seconds": round(seconds, 1), "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "command": command, "torch": str(torch.__version__),
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "taught_from_metadata": {k: v for k, v in teacher.metadata.items() if k in ("command", "recipe", "data", "taught")},
    }
    save_checkpoint(out, student, config, metadata)
    out.with_suffix(".md").write_text(model_card(out, config, metadata["taught"], n_old), encoding="utf-8")
    return TeachResult(out, config.labels, new_labels, validation, before, after, seconds, timings)


def _content_sha(checkpoint: Checkpoint) -> str | None:
    try:
        payload = torch.load(checkpoint.path, weights_only=True)
        return payload.get("content_sha256")
    except Exception:  # the hash is a record, not a check: the checkpoint already loaded
        return None


def model_card(path: Path, config: DetectorConfig, taught: dict[str, Any], n_old: int) -> str:
    """A short markdown model card: classes, clips (name, sha256, split), validation, settings."""
    lines = [f"# {path.stem}", "",
             f"Taught with `python -m train.teach` from `{taught['from']}` on {taught['written']}"
             f" in {taught['seconds']:.0f} s.", "",
             f"Classes ({len(config.labels)}): {', '.join(config.labels)}. Old classes: the first {n_old}"
             + (" (unchanged: trunk and their head rows frozen)." if not taught["negatives"] else
                " (their head rows distilled from the original, 0 on the negatives, each held back toward the "
                "original as far as its held-out clips need; "
                + ("the last block adapted with an L2-SP pull toward its original weights)." if taught["adapt_loss"]
                   else "the last block as it was).")), ""]
    if taught["validation"]:
        lines += ["## New classes on validation scenes (held-out clips)", "",
                  "| class | event F1 tuned | event F1 at 0.5 | reference events | median | on | off | min event s | min gap s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in taught["validation"]:
            lines.append(f"| {row['label']} | {row['event_f1_tuned']:.3f} | {row['event_f1_default']:.3f} | "
                         f"{row['reference_events']} | {row['smoothing_frames']} | {row['on']:.2f} | {row['off']:.2f} | "
                         f"{row['min_event_s']:.2f} | {row['min_gap_s']:.2f} |")
        lines.append("")
    if taught["negatives"]:
        lines += [f"Old-class events on the negative clips: {taught['negative_events_before']} before, "
                  f"{taught['negative_events_after']} after.", ""]
    if taught.get("old_class_check"):
        lines += ["## Old classes on scenes of their held-out clips (frame F1, their own decoders)", "",
                  "| class | before | fitted row | kept row | share of the fitted change kept | adapted block |",
                  "|---|---|---|---|---|---|"]
        for label, row in taught["old_class_check"].items():
            adapted = f"{row['adapted']:.3f}" if "adapted" in row else "-"
            lines.append(f"| {label} | {row['before']:.3f} | {row['head']:.3f} | {row['kept']:.3f} | {row['share']:g} | "
                         f"{adapted} |")
        lines.append("")
    lines += ["## Clips used", "", "| class | file | split | extent | seconds | sha256 |", "|---|---|---|---|---|---|"]
    for c in taught["clips"] + taught["negatives"]:
        lines.append(f"| {c['class'] or '(negative)'} | {c['file']} | {c['split'] if c['class'] else 'train'} | "
                     f"{c['extent']} | {c['seconds']:.2f} | `{c['sha256']}` |")
    lines += ["", f"World pools: {', '.join(taught['world']) or 'none (generated noise beds only)'}; "
              f"distractors: {taught['distractors'] or 'none'}.", "",
              "Settings: `" + json.dumps(taught["settings"]) + "`", ""]
    if taught["command"]:
        lines += ["Command: `" + taught["command"] + "`", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- CLI


def _pairs(items: list[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        label, sep, value = item.partition("=")
        if not sep or not label.strip() or not value.strip():
            raise TeachError(f"{option} {item!r}: write {option} LABEL=PATH, e.g. {option} doorbell=clips/doorbell/")
        if label.strip() in out:
            raise TeachError(f"{option} {label.strip()} is given twice: put all its clips in one folder")
        out[label.strip()] = value.strip()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.teach", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TeachConfig()
    p.add_argument("--from", dest="source", required=True, help="the detector to extend: a checkpoint path or a "
                   "bundled name (dnd_7_10)")
    p.add_argument("--add", action="append", default=[], metavar="LABEL=FOLDER",
                   help=f"a new class from a folder of at least {MIN_CLIPS} clips (any format and rate); repeatable")
    p.add_argument("--extents", action="append", default=[], metavar="LABEL=TSV",
                   help="event extents of LABEL's clips (filename, onset, offset; tab-separated, header line) "
                        "instead of finding them in the audio")
    p.add_argument("--negatives", action="append", default=[], metavar="FOLDER",
                   help="recordings the detector wrongly fires on: mixed in unlabelled, old classes taught 0 there")
    p.add_argument("--world", action="append", default=[], metavar="FOLDER",
                   help="world pool(s) of speech, music and ambience (meta.csv: filename, category, group, ...)")
    p.add_argument("--distractors", help="an event-pool folder (meta.csv or one sub-folder per class) mixed in unlabelled")
    p.add_argument("--out", required=True, help="output checkpoint (.pt); the model card is written beside it (.md)")
    p.add_argument("--scenes", type=int, default=d.scenes, help=f"training scenes (default {d.scenes})")
    p.add_argument("--val-scenes", type=int, default=d.val_scenes)
    p.add_argument("--head-steps", type=int, default=d.head_steps,
                   help=f"most L-BFGS passes of the head over the cached frames (default {d.head_steps})")
    p.add_argument("--held-out", type=float, default=d.held_out, help="fraction of each class's clips for validation")
    p.add_argument("--no-augment", action="store_true", help="no pitch/stretch/reverb/microphone augmentation")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = TeachConfig(scenes=args.scenes, val_scenes=args.val_scenes, head_steps=args.head_steps, held_out=args.held_out,
                          augment=not args.no_augment, seed=args.seed)
        result = teach(args.source, _pairs(args.add, "--add"), args.out, negatives=args.negatives,
                       extents=_pairs(args.extents, "--extents"), world=args.world, distractors=args.distractors,
                       cfg=cfg, progress=not args.quiet,
                       command="python -m train.teach " + " ".join(sys.argv[1:] if argv is None else argv))
    except TeachError as exc:
        print(f"train.teach: {exc}", file=sys.stderr)
        return 2
    for row in result.validation:
        print(f"{row['label']}: validation event F1 {row['event_f1_tuned']:.3f} with its tuned decoder "
              f"(on {row['on']:.2f}, off {row['off']:.2f}, median {row['smoothing_frames']}), "
              f"{row['event_f1_default']:.3f} at 0.5; {row['reference_events']} held-out events")
    if result.negatives_before or result.negatives_after:
        print(f"old-class events on the negative clips: {result.negatives_before} before, {result.negatives_after} after")
    print(f"wrote {result.path} ({len(result.labels)} classes: {', '.join(result.labels)}) and "
          f"{result.path.with_suffix('.md')} in {result.seconds / 60:.1f} min "
          f"({result.timings['cpu_s'] / 60:.1f} CPU-min; head fit {result.timings['head_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
