"""``python -m train.fit``: train any model of the paper's grid; writes a checkpoint.

Defaults are the paper's recipe (docs/reference.md): BCE with logits, Adam lr 1e-3 (default betas,
no weight decay, no schedule), batch 16 sequences of 1024 frames, at most 300 epochs, stop after
30 epochs without improvement; except that the weights kept are those of the best validation
event F1 of the events a user gets, decoded by the per-class decoder train.tune chooses on the
validation probabilities of that epoch (saved in best.pt; ``--select event_f1`` decodes with the
untuned 0.5 decoder instead, ``psds1|loss`` select by PSDS1 or the paper's lowest validation loss).

    python -m train.fit --model dnd_7_10 --data scenes/ --out runs/dnd_7_10
    python -m train.fit --model dnd_7_10 --data scenes/ --out runs/dnd_7_10 --resume
    torchrun --nproc_per_node 2 -m train.fit --model dnd_7_10 --data scenes/ --out runs/ddp

On-the-fly training (train.onthefly): ``--events POOL`` mixes fresh training scenes every epoch
(``--steps-per-epoch`` batches) from the event pool's training folds, ``--distractors`` and
``--world`` pools, with train.mixing.MixConfig's levels and train.augment's augmentation
(``--mix JSON``, ``--set mix.FIELD=V``, ``--set augment.FIELD=V``); ``--data`` or ``--val-data``
give the fixed validation files (train.synth with the same pools and ``--mix default``):

    python -m train.fit --model dnd_7_10 --events ../shared/data/esc10 --distractors ../shared/data/esc50-fold4 \
        --world ../pool --world ../shared/data/fsdd-train --licenses CC0,CC-BY --data scenes/ --out runs/otf

Writes ``<out>/best.pt`` (an rtsed checkpoint, atomically, whenever the selection score improves) and
``<out>/last.pt`` (everything needed to resume: weights, optimiser, epoch, position inside the
epoch, RNG, history), at each epoch's end and every ``--save-every-s`` seconds inside one, so a
run killed mid-epoch resumes where it stopped with ``--resume``.

``--lr-decay F`` (off by default, as in the paper) multiplies the learning rate by F whenever the
selection score has not improved for ``--lr-decay-patience`` epochs (torch's ReduceLROnPlateau), down
to ``--min-lr``; its state is saved in last.pt. Resuming a run that had no schedule with one starts
the schedule from the run's best score and its epochs without improvement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rtsed.backends.allocator import ensure_caching_allocator, loaded_allocator
from rtsed.audio.files import AudioFileError
from rtsed.atomic import OutputError, remove_stale_temporaries
from rtsed.models.checkpoint import atomic_torch_save, save_checkpoint
from rtsed.config import ConfigError, DecoderConfig, DetectorConfig, FrontendConfig, ModelConfig
from rtsed.metrics import frame_scores
from rtsed.models.model import SEDModel, count_parameters
from rtsed.backends.precision import PRECISIONS, cpu_has_bf16_gemm
from rtsed.serve.decode import decode_offline
from train.annotations import AnnotationError, Event, events_to_frame_targets
from train.data_sources import open_dataset
from train.datasets import DatasetError
from train.features import SEQUENCE_FRAMES, FeatureCache, SequenceDataset, load_split, normalization_stats
from train.label_check import check_labels
from train.mixing import MixError
from train.tune import default_max_smoothing_s, tune_decoder

SELECTIONS = ("tuned_event_f1", "event_f1", "psds1", "loss")
COLLAR_S = 0.2  # event F1 as DESIGN.md defines it: onset collar 200 ms, offset max(200 ms, 20 %)
OFFSET_FRACTION = 0.2

LAST_STATE_VERSION = 1


@dataclass
class Recipe:
    """Training hyper-parameters (the paper's by default)."""

    epochs: int = 300
    patience: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    sequence_frames: int = SEQUENCE_FRAMES
    save_every_s: float = 300.0
    precision: str = "fp32"  # "bf16": the forward under CPU autocast (PRECISIONS)
    select: str = "tuned_event_f1"  # what best.pt maximises on validation (SELECTIONS)
    steps_per_epoch: int = 50  # on-the-fly training: batches of fresh scenes per epoch
    workers: int = 1  # on-the-fly training: DataLoader worker processes mixing scenes
    lr_decay: float = 1.0  # learning-rate factor on a plateau of the selection score (1: constant lr)
    lr_decay_patience: int = 5  # epochs without improvement before the lr is multiplied by lr_decay
    min_lr: float = 1e-5


@dataclass
class Progress:
    """Where a run stands; saved in last.pt (plain types only, so weights_only loading works)."""

    epoch: int = 0  # the epoch in progress (0-based)
    step: int = 0  # batches of that epoch already done
    loss_sum: float = 0.0  # sum of batch losses so far in that epoch
    best_val_loss: float = math.inf  # validation loss of the best epoch
    best_score: float = -math.inf  # the selection score of the best epoch (higher is better)
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------- distributed set-up


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------- one step


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over real (unpadded) frames and all classes; logits/targets (B, T, C),
    mask (B, T). Equals the paper's plain mean when nothing is padded."""
    per = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (per * mask[..., None]).sum() / (mask.sum() * logits.shape[-1]).clamp_min(1.0)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, mask: torch.Tensor, precision: str = "fp32") -> float:
    """Forward, masked BCE, backward, Adam: one optimiser step on one (shard of a) batch.
    Returns the batch's mean loss (over the whole global batch under DDP).

    precision "bf16" runs the forward under ``torch.autocast(device, bfloat16)``: on the CPU the
    fast paths then run their big GEMMs in bf16 with float32 accumulation (rtsed.backends.cpu_block,
    rtsed.backends.cpu_head) and keep everything else (BN statistics, activations, gradients, weights,
    Adam) in float32; the loss is computed in float32.

    Under DDP the backward averages gradients over the W processes, so each process scales its
    loss sum by W / (real frames of the whole global batch): the gradient is then that of the
    global batch's mean, as in one process, even when padding leaves the shards with different
    numbers of real frames (a per-shard mean would weight a frame of a padded shard more)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x)
    logits = logits.float()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        per = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        local = (per * mask[..., None]).sum()
        totals = torch.stack([local.detach(), mask.sum() * logits.shape[-1]])
        dist.all_reduce(totals)  # [global loss sum, global real cells]
        loss = local * (dist.get_world_size() / totals[1].clamp_min(1.0))
        loss.backward()
        optimizer.step()
        return float(totals[0] / totals[1].clamp_min(1.0))
    loss = masked_bce(logits, y, mask)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def validate(model: SEDModel, data: SequenceDataset, batch_size: int, device: torch.device) -> dict[str, float]:
    """Mean validation loss and frame-wise F1/ER (docs/reference.md's definitions, threshold 0.5)."""
    model.eval()
    loss_sum, weight = 0.0, 0.0
    probs, targets = [], []
    for start in range(0, len(data), batch_size):
        batch = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        x, y, mask = (torch.stack(t).to(device) for t in zip(*batch))
        logits = model(x)
        n = float(mask.sum())
        loss_sum += float(masked_bce(logits, y, mask)) * n
        weight += n
        keep = mask.bool()
        probs.append(torch.sigmoid(logits)[keep].cpu().numpy())
        targets.append(y[keep].cpu().numpy())
    scores = frame_scores(np.concatenate(probs), np.concatenate(targets))
    return {"val_loss": loss_sum / max(weight, 1.0), "val_f1": scores.f1, "val_er": scores.error_rate}


@dataclass(frozen=True)
class TuningFile:
    """One validation file as the decoder search reads it: probabilities and frame targets (T, C),
    reference events."""

    probs: np.ndarray
    targets: np.ndarray
    events: tuple[Event, ...]


@torch.no_grad()
def validate_events(model: SEDModel, files: list, references: list[tuple[str, float, float, str]],
                    labels: tuple[str, ...], hop_s: float, decoder: DecoderConfig, device: torch.device,
                    psds: bool = False, tune_smoothing_s: float | None = None) -> tuple[dict[str, float], DecoderConfig]:
    """What a user sees, on whole validation files: each file's normalised features (T, F) through
    the model in one pass, a decoder (rtsed.decode: the events rtsed.detect and rtsed.live report),
    sed_eval event F1 (DESIGN.md: onset collar 200 ms, offset collar max(200 ms, 20 % of the
    event)); with ``psds``, PSDS1 on the raw probabilities (sed_scores_eval, over the classes that
    have reference events). files: [(key, x (T, F) float32)].

    The decoder is ``decoder`` or, with ``tune_smoothing_s`` (the largest smoother delay, s), the one
    train.tune chooses per class on these probabilities (one coordinate-descent round): an untrained
    decoder at 0.5 scores near 0 for many epochs whatever the model learns, so selecting by it is
    noise. Returns the scores and the decoder used."""
    from rtsed.metrics import event_scores, psds1

    model.eval()
    probs, estimated = {}, []
    for key, x in files:
        probs[key] = torch.sigmoid(model(torch.from_numpy(x)[None].to(device))[0]).float().cpu().numpy()
    if tune_smoothing_s is not None:
        tuning = []
        for key, p in probs.items():
            events = tuple(Event(f, a, b, c) for f, a, b, c in references if f == key)
            tuning.append(TuningFile(p, events_to_frame_targets(events, p.shape[0], hop_s, labels), events))
        decoder, _ = tune_decoder(tuning, hop_s, labels, max_smoothing_s=tune_smoothing_s, rounds=1)
    for key, p in probs.items():
        estimated += [(key, e.onset_s, e.offset_s, e.label) for e in decode_offline(p, labels, hop_s, decoder)]
    out = {"val_event_f1": event_scores(references, estimated, labels, collar_s=COLLAR_S, evaluate_offset=True,
                                        offset_fraction=OFFSET_FRACTION).f1}
    if psds:
        present = sorted({r[3] for r in references}, key=labels.index)
        keep = [labels.index(c) for c in present]
        value = float("nan")
        if keep:
            try:
                value = psds1({k: (p[:, keep], hop_s, present) for k, p in probs.items()},
                              {k: [(a, b, c) for f, a, b, c in references if f == k] for k in probs}).psds
            except (ValueError, RuntimeError, AssertionError):  # sed_scores_eval checks with assert
                value = float("nan")
        out["val_psds1"] = value
    for k, v in out.items():
        out[k] = 0.0 if not math.isfinite(v) else float(v)  # no events at all: sed_eval gives nan
    return out, decoder


def selection_score(select: str, scores: dict[str, float]) -> float:
    """Higher is better: event F1, PSDS1, or minus the validation loss."""
    return {"tuned_event_f1": lambda: scores["val_event_f1"], "event_f1": lambda: scores["val_event_f1"],
            "psds1": lambda: scores["val_psds1"],
            "loss": lambda: -scores["val_loss"]}[select]()


# --------------------------------------------------------------------------------- the loop


def epoch_order(n_items: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shuffled item order, a pure function of (seed, epoch): a resumed run replays
    the same order and skips the batches already done."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_items, generator=g).tolist()


def batches_for_rank(order: list[int], batch_size: int, ddp: Dist) -> list[list[int]]:
    """Global batches of batch_size items; under DDP each process takes an equal shard of each
    (batch_size must divide by the world size). The last partial global batch is dropped only
    under DDP, where shards must stay equal."""
    out = []
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        if ddp.world > 1:
            if len(batch) < batch_size:
                break
            per = batch_size // ddp.world
            batch = batch[ddp.rank * per:(ddp.rank + 1) * per]
        out.append(batch)
    return out


def run(args: argparse.Namespace) -> Path | None:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    ddp = init_distributed(device)
    if device.type == "cuda" and ddp.world > 1:
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    recipe = Recipe(epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, lr=args.lr,
                    seed=args.seed, save_every_s=args.save_every_s, precision=args.precision, select=args.select,
                    steps_per_epoch=args.steps_per_epoch, workers=args.workers,
                    sequence_frames=args.sequence_frames, lr_decay=args.lr_decay,
                    lr_decay_patience=args.lr_decay_patience, min_lr=args.min_lr)
    if not 0.0 < recipe.lr_decay <= 1.0:
        raise SystemExit(f"--lr-decay {recipe.lr_decay}: give a factor in (0, 1], e.g. 0.5 (1 keeps the lr constant)")
    if recipe.precision == "bf16" and device.type != "cpu":
        raise SystemExit("--precision bf16 is the CPU training path's (its GEMMs in bf16, tested to converge); "
                         f"on {device.type} it has not been measured yet: train with --precision fp32")
    if recipe.precision == "bf16" and not cpu_has_bf16_gemm():
        warnings.warn("--precision bf16: this CPU has no AVX512_BF16 or AMX-BF16, so bf16 GEMMs are emulated and "
                      "likely slower than fp32; train with --precision fp32", RuntimeWarning, stacklevel=2)
    if ddp.world > 1 and recipe.batch_size % ddp.world:
        raise SystemExit(f"--batch-size {recipe.batch_size} must divide by the {ddp.world} processes")
    seed_everything(recipe.seed)
    out = Path(args.out)
    log = print if ddp.main else (lambda *a, **k: None)

    mixer = mix = sources = None
    if args.events:  # on-the-fly: fresh training scenes each epoch; validation stays files
        from train.onthefly import OnTheFlyScenes, SceneMixer, Sources, scene_seconds

        mix = mix_config(args)
        sources = Sources(pool=args.events, distractors=args.distractors, world=tuple(args.world),
                          licenses=_csv(args.licenses), classes=_csv(args.classes),
                          world_minutes=None if args.world_minutes < 0 else args.world_minutes)
        frontend = apply_overrides(FrontendConfig.for_rate(mix.sample_rate_hz), args.set, "frontend")
        mix = mix.replace(scene_s=scene_seconds(frontend, recipe.sequence_frames))
        try:
            mixer = SceneMixer(sources, mix, recipe.seed)
        except MixError as exc:
            raise SystemExit(f"data error: {exc}") from None
        labels = mixer.labels
        if args.labels and tuple(s.strip() for s in args.labels.split(",")) != labels:
            raise SystemExit(f"--labels {args.labels} differ from the pools' classes {','.join(labels)}")
        args.labels = ",".join(labels)
        dataset = open_dataset(args)
        log(mixer.summary())
        manifest = Path(args.data) / "manifest.json" if args.data else None
        if manifest is not None and manifest.is_file():
            held = json.loads(manifest.read_text(encoding="utf-8")).get("world_groups", {})
            shared = set(mixer.world_groups) & set(held.get("validate", []) + held.get("test", []))
            if shared:
                raise SystemExit(f"world groups {sorted(shared)[:5]} feed both the on-the-fly training scenes and "
                                 f"{manifest.parent}'s validation/test scenes: pass train.synth and train.fit the "
                                 "same --world pools")
    else:
        dataset = open_dataset(args)
        labels = dataset.labels
        listed = [s.strip() for s in args.labels.split(",")] if args.labels else None
        for line in check_labels(dataset, listed):  # LabelError for labels never heard in training
            if ddp.main:
                print(f"warning: {line}", file=sys.stderr)
        first_rate = dataset.split("train")[0].sample_rate_hz
        frontend = apply_overrides(FrontendConfig.for_rate(first_rate), args.set, "frontend")
    model_config = apply_overrides(ModelConfig.from_name(args.model, n_classes=len(labels),
                                                         n_mels=frontend.n_mels), args.set, "model")
    cache = FeatureCache(args.cache_dir, frontend)
    log(dataset.summary())
    val_pairs = dataset.pairs("validate")
    val_files = load_split(val_pairs, cache, labels)
    if mixer is not None:
        train_data = OnTheFlyScenes(mixer, frontend, None, recipe.seed, recipe.steps_per_epoch * recipe.batch_size,
                                    recipe.sequence_frames, mix.augment)
        norm = train_data.statistics(args.stats_scenes)
        train_data.set_norm(norm)
    else:
        train_files = load_split(dataset.pairs("train"), cache, labels)
        norm = normalization_stats(train_files)
        train_data = SequenceDataset(train_files, norm, recipe.sequence_frames)
    config = DetectorConfig(frontend=frontend, model=model_config, labels=tuple(labels), normalization=norm,
                            decoder=DecoderConfig())
    val_data = SequenceDataset(val_files, norm, recipe.sequence_frames)
    mean, std = np.asarray(norm.mean, dtype=np.float32), np.asarray(norm.std, dtype=np.float32)
    val_whole = [(str(f.path), (f.features - mean) / std) for f in val_files]
    val_refs = [(str(path), e.onset_s, e.offset_s, e.event_label) for path, events in val_pairs for e in events]
    onthefly_meta = None if mixer is None else {"mix": mix.to_dict(), "sources": sources.to_dict(),
                                                "world_groups": mixer.world_groups}

    model = SEDModel(model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    progress = Progress()
    last_path = out / "last.pt"
    scheduler = plateau_scheduler(optimizer, recipe)
    if ddp.main and out.is_dir():
        # The temporary files of a save that a kill interrupted (atomic_torch_save: .last.pt.*.tmp,
        # .best.pt.*.tmp): the folder is this run's, so no other writer can own them.
        for stale in remove_stale_temporaries(out, ".*.pt.*.tmp"):
            log(f"removed {stale.name} (left by a run killed while saving)")
    if args.resume:
        progress = resume_from(last_path, model, optimizer, config, recipe, log, onthefly_meta, scheduler)
    elif last_path.exists():
        raise SystemExit(f"{last_path} exists: pass --resume to continue that run, or choose another --out")
    if args.resume and ddp.rank > 0:
        # last.pt holds rank 0's RNG; the other ranks' dropout streams restart from their own seed.
        torch.manual_seed(hash((recipe.seed, ddp.rank, progress.epoch, progress.step)) % 2**63)
    net: torch.nn.Module = model
    if ddp.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    what = (f"{len(train_data)} fresh training scenes per epoch ({recipe.workers} mixing worker(s))"
            if mixer is not None else f"{len(train_data)} training")
    log(f"{model_config.name}: {count_parameters(model):,} parameters, {what} and "
        f"{len(val_data)} validation sequences of {recipe.sequence_frames} frames, device {device}, "
        f"{ddp.world} process(es), {torch.get_num_threads()} threads each, {recipe.precision}, "
        f"best.pt by {recipe.select}, {loaded_allocator()}")
    best_path = out / "best.pt"
    psds = recipe.select == "psds1"
    for epoch in range(progress.epoch, recipe.epochs):
        started = time.perf_counter()
        if progress.step == 0:
            # Dropout RNG seeded per (seed, process, epoch): resumed and uninterrupted runs agree
            # from the next epoch on, and each DDP process draws its own masks.
            torch.manual_seed(recipe.seed * 1_000_003 + epoch * 1009 + ddp.rank)
        if mixer is not None:
            # Items are pure functions of (seed, epoch, index): no shuffle needed, none possible to lose.
            batches = batches_for_rank(list(range(len(train_data))), recipe.batch_size, ddp)
        else:
            batches = batches_for_rank(epoch_order(len(train_data), recipe.seed, epoch), recipe.batch_size, ddp)
        net.train()
        last_save = time.perf_counter()
        bar = progress_bar(len(batches), progress.step, f"epoch {epoch + 1}/{recipe.epochs}", ddp.main)
        timing = {"make_s": 0.0, "wait_s": 0.0, "step_s": 0.0, "n": 0}
        for step, (x, y, mask) in zip(range(progress.step, len(batches)),
                                      training_batches(train_data, batches, progress.step, epoch, recipe, mix,
                                                       device, timing)):
            t0 = time.perf_counter()
            loss = train_step(net, optimizer, x, y, mask, recipe.precision)
            timing["step_s"] += time.perf_counter() - t0
            if not math.isfinite(loss):
                raise SystemExit(f"epoch {epoch + 1} step {step + 1}: loss is {loss}; training diverged "
                                 f"(last good state: {last_path})")
            progress.step, progress.loss_sum = step + 1, progress.loss_sum + loss
            bar.update(1)
            # refresh=False: set_postfix would otherwise redraw on every batch, defeating mininterval
            bar.set_postfix(loss=f"{progress.loss_sum / progress.step:.4f}", refresh=False)
            if ddp.main and time.perf_counter() - last_save > recipe.save_every_s:
                save_last(last_path, model, optimizer, config, recipe, progress, onthefly_meta, scheduler)
                last_save = time.perf_counter()
        bar.close()
        train_loss = progress.loss_sum / max(len(batches), 1)
        stop = torch.zeros(2, dtype=torch.float64)  # [stop?, the lr of the next epoch]
        if ddp.main:
            scores = validate(model, val_data, recipe.batch_size, device)
            event_scores_, decoder = validate_events(
                model, val_whole, val_refs, tuple(labels), frontend.hop_s, config.decoder, device, psds,
                default_max_smoothing_s(model_config.lookahead_frames) if recipe.select == "tuned_event_f1" else None)
            scores.update(event_scores_)
            seconds = time.perf_counter() - started
            score = selection_score(recipe.select, scores)
            improved = score > progress.best_score or (score == progress.best_score
                                                       and scores["val_loss"] < progress.best_val_loss)
            n = max(timing["n"], 1)
            per_batch = {k: timing[k] / n for k in ("make_s", "wait_s", "step_s")}
            lr = optimizer.param_groups[0]["lr"]
            record = {"epoch": epoch + 1, "train_loss": train_loss, **scores, "lr": lr, "seconds": seconds,
                      **{f"batch_{k}": v for k, v in per_batch.items()}}
            progress.history.append(record)
            if improved:
                progress.best_val_loss, progress.best_score = scores["val_loss"], score
                progress.best_epoch, progress.bad_epochs = epoch + 1, 0
                save_checkpoint(best_path, model, config.replace(decoder=decoder),
                                metadata=run_metadata(args, recipe, progress, dataset, onthefly_meta))
            else:
                progress.bad_epochs += 1
            if scheduler is not None:
                scheduler.step(score)
            log(f"epoch {epoch + 1:3d}  train_loss {train_loss:.4f}  val_loss {scores['val_loss']:.4f}  "
                f"val_F1 {scores['val_f1']:.3f}  val_ER {scores['val_er']:.3f}  {seconds:6.1f} s  "
                f"event_F1 {scores['val_event_f1']:.3f}" + (f"  PSDS1 {scores['val_psds1']:.3f}" if psds else "")
                + f"  per batch: make {per_batch['make_s']:.2f} s, wait {per_batch['wait_s']:.2f} s, "
                f"step {per_batch['step_s']:.2f} s" + ("  *best" if improved else "")
                + (f"  lr {lr:.3g}" if scheduler is not None else ""))
            stop[0] = float(progress.bad_epochs >= recipe.patience)
            stop[1] = optimizer.param_groups[0]["lr"]
        progress.epoch, progress.step, progress.loss_sum = epoch + 1, 0, 0.0
        if ddp.main:
            save_last(last_path, model, optimizer, config, recipe, progress, onthefly_meta, scheduler)
        if ddp.world > 1:
            dist.broadcast(stop, src=0)
            for group in optimizer.param_groups:  # the schedule runs on rank 0, which alone validates
                group["lr"] = float(stop[1])
        if stop[0].item():
            log(f"no improvement for {recipe.patience} epochs: stopping")
            break
    if ddp.main:
        log(f"best epoch {progress.best_epoch} ({recipe.select} {abs(progress.best_score):.4f}, "
            f"val_loss {progress.best_val_loss:.4f}): {best_path}")
    if ddp.world > 1:
        # Tear down together: a rank that destroys its gloo group while a peer still talks on it
        # can abort ("terminate called without an active exception"; seen ~1 in 10 CI runs).
        dist.barrier()
        dist.destroy_process_group()
    return best_path if ddp.main else None


def training_batches(train_data, batches: list[list[int]], first: int, epoch: int, recipe: Recipe, mix,
                     device: torch.device, timing: dict[str, float]):
    """(x, y, mask) of batches[first:], on device. Counts in ``timing``: make_s (seconds of one
    process's work to produce the batches: mixing, augmentation, log-mel), wait_s (seconds the
    train step waited for them), n (batches).

    Files: items cut from cached features, made here. On the fly: scenes mixed by ``recipe.workers``
    forked DataLoader workers (none: here), which copy the dataset (its epoch) when the iterator
    starts; the loader's own seed comes from a generator of its own, so the dropout stream of the
    main process is untouched and a resumed run stays exact. Mixup (AugmentConfig.mixup_p) draws
    from (seed, epoch, batch)."""
    from train.augment import mixup

    if not hasattr(train_data, "epoch"):
        for step in range(first, len(batches)):
            t0 = time.perf_counter()
            x, y, mask = (torch.stack(t).to(device) for t in zip(*(train_data[i] for i in batches[step])))
            spent = time.perf_counter() - t0
            timing["make_s"] += spent
            timing["wait_s"] += spent
            timing["n"] += 1
            yield x, y, mask
        return
    from torch.utils.data import DataLoader

    from train.onthefly import worker_init

    train_data.epoch = epoch
    workers = recipe.workers
    loader = DataLoader(train_data, batch_sampler=batches[first:], num_workers=workers,
                        worker_init_fn=worker_init if workers else None,
                        multiprocessing_context="fork" if workers else None,
                        generator=torch.Generator().manual_seed(recipe.seed * 7919 + epoch),
                        prefetch_factor=2 if workers else None)
    augment = mix.augment
    it = iter(loader)
    for step in range(first, len(batches)):
        t0 = time.perf_counter()
        x, y, mask, seconds = next(it)
        timing["wait_s"] += time.perf_counter() - t0
        timing["make_s"] += float(seconds.sum())
        timing["n"] += 1
        if augment is not None and augment.mixup_p > 0:
            x, y, mask = mixup(x, y, mask, np.random.default_rng([recipe.seed, epoch, step, 1]),
                               augment.mixup_p, augment.mixup_alpha)
        yield x.to(device), y.to(device), mask.to(device)


# ---------------------------------------------------------------------------- state and config


def plateau_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe):
    """ReduceLROnPlateau on the selection score (higher is better), or None for a constant lr.
    threshold 0: any gain counts as an improvement, as it does for best.pt."""
    if recipe.lr_decay >= 1.0:
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=recipe.lr_decay, patience=recipe.lr_decay_patience,
        threshold=0.0, min_lr=recipe.min_lr)


def save_last(path: Path, model: SEDModel, optimizer: torch.optim.Optimizer, config: DetectorConfig,
              recipe: Recipe, progress: Progress, onthefly: dict[str, Any] | None = None,
              scheduler=None) -> None:
    atomic_torch_save({
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "onthefly": onthefly,
        "format": "rtsed-train-state", "format_version": LAST_STATE_VERSION,
        "config": config.to_dict(), "recipe": asdict(recipe), "progress": asdict(progress),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }, path)


def resume_from(path: Path, model: SEDModel, optimizer: torch.optim.Optimizer, config: DetectorConfig,
                recipe: Recipe, log, onthefly: dict[str, Any] | None = None, scheduler=None) -> Progress:
    if not path.exists():
        raise SystemExit(f"--resume: {path} does not exist; start the run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SystemExit(f"--resume: {path} cannot be read ({exc}); delete it to start afresh") from None
    if state.get("format") != "rtsed-train-state" or state.get("format_version") != LAST_STATE_VERSION:
        raise SystemExit(f"--resume: {path} is not a training state of this rtsed version")
    saved = Recipe(**state["recipe"])
    if state.get("onthefly") != onthefly or (onthefly and saved.steps_per_epoch != recipe.steps_per_epoch):
        raise SystemExit(f"--resume: {path} was written with other on-the-fly scenes (pools, --mix, --set mix.*, "
                         "--steps-per-epoch); resume with the same arguments")
    if state["config"] != config.to_dict():
        raise SystemExit(f"--resume: {path} was written with another config (model, front end, labels or "
                         "training-split statistics differ); resume with the same arguments and data")
    saved = Recipe(**state["recipe"])
    if (saved.seed, saved.batch_size, saved.sequence_frames) != (recipe.seed, recipe.batch_size, recipe.sequence_frames):
        raise SystemExit(f"--resume: {path} used seed/batch/sequence {saved.seed}/{saved.batch_size}/"
                         f"{saved.sequence_frames}; pass the same values")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    progress = Progress(**state["progress"])
    if scheduler is not None:
        if state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
            # The factor, patience and floor are this command's, so a resumed run can change them.
            scheduler.factor, scheduler.patience = recipe.lr_decay, recipe.lr_decay_patience
            scheduler.min_lrs = [recipe.min_lr] * len(optimizer.param_groups)
        else:
            scheduler.best, scheduler.num_bad_epochs = progress.best_score, progress.bad_epochs
            scheduler.last_epoch = progress.epoch
    log(f"resuming {path}: epoch {progress.epoch + 1}, batch {progress.step}, best epoch {progress.best_epoch} "
        f"(val_loss {progress.best_val_loss:.4f})")
    return progress


def apply_overrides(config, assignments: list[str], section: str):
    """Apply ``--set section.field=value`` (value parsed as JSON, else taken as a string)."""
    changes: dict[str, Any] = {}
    for item in assignments or []:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {item!r}: write section.field=value, e.g. model.dropout=0.1")
        sec, name = key.split(".", 1)
        if sec not in ("frontend", "model", "mix", "augment"):
            raise SystemExit(f"--set {item!r}: section must be 'frontend', 'model', 'mix' or 'augment'")
        if sec != section:
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        changes[name] = tuple(value) if isinstance(value, list) else value
    if not changes:
        return config
    try:
        return config.replace(**changes)
    except (TypeError, ConfigError) as exc:
        raise SystemExit(f"--set: {exc}") from None


def _csv(text: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None


def mix_config(args: argparse.Namespace):
    """The on-the-fly MixConfig: defaults, or ``--mix`` (a JSON file of MixConfig fields), then
    ``--set mix.FIELD=VALUE`` and ``--set augment.FIELD=VALUE`` (``--set mix.augment=null`` turns
    waveform and feature augmentation off)."""
    from train.augment import AugmentConfig
    from train.mixing import MixConfig

    base: dict[str, Any] = {"augment": AugmentConfig().to_dict()}
    if args.mix:
        base.update(json.loads(Path(args.mix).read_text(encoding="utf-8")))
    base.update(_assignments(args.set, "mix"))
    augment = _assignments(args.set, "augment")
    if augment:
        if base.get("augment") is None:
            raise SystemExit("--set augment.*: augmentation is off (mix.augment is null)")
        base["augment"] = {**dict(base["augment"]), **augment}
    try:
        return MixConfig.from_dict(base)
    except (MixError, TypeError, ValueError) as exc:
        raise SystemExit(f"--mix/--set: {exc}") from None


def _assignments(items: list[str], section: str) -> dict[str, Any]:
    out = {}
    for item in items or []:
        key, _, raw = item.partition("=")
        if key.startswith(section + "."):
            try:
                out[key[len(section) + 1:]] = json.loads(raw)
            except json.JSONDecodeError:
                out[key[len(section) + 1:]] = raw
    return out


def run_metadata(args: argparse.Namespace, recipe: Recipe, progress: Progress, dataset,
                 onthefly: dict[str, Any] | None = None) -> dict[str, Any]:
    best = progress.history[-1] if progress.history and progress.history[-1]["epoch"] == progress.best_epoch else {}
    return {
        "select": recipe.select,
        "val_event_f1": best.get("val_event_f1"),
        "onthefly": onthefly,
        "command": "python -m train.fit " + " ".join(sys.argv[1:]),
        "recipe": asdict(recipe),
        "epoch": progress.best_epoch,
        "val_loss": progress.best_val_loss,
        "history": progress.history,
        "data": dataset.summary(),
        "torch": str(torch.__version__),  # TorchVersion is a str subclass weights_only refuses
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar with loss and ETA on stderr (quiet on non-main processes)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=False,
                mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.fit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dnd_7_10", help="grid name: base, dws, dil_K_d, dnd_K_d[, _causal]")
    p.add_argument("--data", help="TUT-SED Synthetic 2016 root, or a folder written by train.synth")
    p.add_argument("--train-data", nargs=2, metavar=("AUDIO_DIR", "TSV"), help="a DCASE-format training split")
    p.add_argument("--val-data", nargs=2, metavar=("AUDIO_DIR", "TSV"), help="a DCASE-format validation split")
    p.add_argument("--test-data", nargs=2, metavar=("AUDIO_DIR", "TSV"), help="a DCASE-format test split")
    p.add_argument("--labels", help="comma-separated class list (default: from the data). Labels found only in "
                   "validation/test are refused and rare or typo-like ones warned about, unless listed here")
    p.add_argument("--out", required=True, help="run folder: best.pt, last.pt")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    r = Recipe()
    p.add_argument("--epochs", type=int, default=r.epochs)
    p.add_argument("--patience", type=int, default=r.patience, help="epochs without improvement of --select")
    p.add_argument("--batch-size", type=int, default=r.batch_size, help="global batch (split across DDP processes)")
    p.add_argument("--lr", type=float, default=r.lr)
    p.add_argument("--sequence-frames", type=int, default=r.sequence_frames,
                   help="frames per training sequence (on the fly: per scene)")
    p.add_argument("--seed", type=int, default=r.seed)
    p.add_argument("--save-every-s", type=float, default=r.save_every_s, help="mid-epoch last.pt interval")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default=r.precision, choices=PRECISIONS,
                   help="bf16: the big GEMMs in bfloat16 (CPU; about 20 %% faster per step on AVX512_BF16 "
                        "CPUs), everything else float32")
    p.add_argument("--cache-dir", default=os.environ.get("RTSED_CACHE", str(Path.home() / ".cache/rtsed/features")),
                   help="feature cache (keyed by front-end config)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override, e.g. --set model.dropout=0.1 --set frontend.n_mels=40 "
                        "--set mix.ebr_db=[0,20] --set augment.mixup_p=0.5")
    p.add_argument("--select", default=r.select, choices=SELECTIONS,
                   help="best.pt is the epoch with the best validation event F1 (decoded with the checkpoint's "
                        "decoder, DESIGN.md's collars), PSDS1, or the lowest validation loss")
    p.add_argument("--lr-decay", type=float, default=r.lr_decay,
                   help="multiply the lr by this factor when --select has not improved for --lr-decay-patience "
                        "epochs (ReduceLROnPlateau; default 1: constant lr, the paper's)")
    p.add_argument("--lr-decay-patience", type=int, default=r.lr_decay_patience)
    p.add_argument("--min-lr", type=float, default=r.min_lr, help="the lr never decays below this")
    g = p.add_argument_group("on-the-fly training scenes (a fresh draw each epoch; --data or --val-data "
                             "then give the validation files only)")
    g.add_argument("--events", metavar="POOL", help="event clips (e.g. ../shared/data/esc10): train on scenes "
                   "mixed on the fly from its training folds (1, 2)")
    g.add_argument("--distractors", metavar="POOL",
                   help="unlabelled distractor clips (the first half of its categories)")
    g.add_argument("--world", action="append", default=[], metavar="POOL",
                   help="speech/music/ambience pool (meta.csv with category and group), repeatable: speech and "
                        "music become classes; the groups train.synth holds out for validation are never used")
    g.add_argument("--world-minutes", type=float, default=120.0,
                   help="audio per world category kept in memory (a random subset by seed; -1: all)")
    g.add_argument("--licenses", help="event and distractor clips with these licences only, e.g. CC0,CC-BY")
    g.add_argument("--classes", help="event classes (default: all of the pool)")
    g.add_argument("--mix", metavar="JSON", help="train.mixing.MixConfig fields (default: its defaults)")
    g.add_argument("--steps-per-epoch", type=int, default=r.steps_per_epoch, help="batches of fresh scenes per epoch")
    g.add_argument("--workers", type=int, default=r.workers, help="DataLoader processes mixing scenes (0: in the loop)")
    g.add_argument("--stats-scenes", type=int, default=32, help="scenes of the fixed draw for normalisation statistics")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if argv is None:  # as a command (not called from Python): big tensors want a caching allocator
        ensure_caching_allocator()
    try:
        run(args)
    except (DatasetError, AnnotationError, AudioFileError) as exc:
        # Bad data found after the data set was opened (an empty split, a label unknown to
        # --labels, audio that fails to decode): the message names the file; no traceback.
        raise SystemExit(f"data error: {exc}") from None
    except ConfigError as exc:  # e.g. an unknown --model name, or --set n_mels the pools do not fit
        raise SystemExit(f"config error: {exc}") from None
    except OutputError as exc:  # a checkpoint that could not be saved, e.g. on a full disk
        raise SystemExit(f"train.fit stopped: {exc}. {Path(args.out) / 'last.pt'} holds the last state saved "
                         "whole: make room, then continue with --resume") from None


if __name__ == "__main__":
    main()
