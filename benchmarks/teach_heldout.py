"""train.teach measured on clips it never saw: new classes from ESC-50, old classes and false alarms
before and after.

    python -m benchmarks.teach_heldout --out runs/teach_heldout \\
        [--from dnd_7_10] [--data ../shared/data] [--world ../pool] [--scenes runs/scenes] \\
        [--add siren --add glass_breaking] [--test-clips 2] [--heldout-scenes 8]

1. **New classes**: ESC-50 fold-4 categories (``<data>/esc50-fold4``) that the detector has never
   heard: not ESC-10 classes and not in the half of the categories that trained it as unlabelled
   distractors (train.synth's rule: the categories sorted by name, the first half trains). Each
   class's clips are split by original recording: whole recordings holding at least
   ``--test-clips`` clips are kept for testing, teach gets the rest (and holds 20 % of those out
   again to tune the new class's decoder).
2. **Teach** at train.teach's default settings over the ``--world`` training pool (speech, music,
   ambience), timed (wall and CPU seconds).
3. **New classes on held-out scenes**: ``--heldout-scenes`` scenes of 60 s mixed (train.mixing,
   no augmentation) from the held-out clips and the fold-4 ESC-10 test clips over the test world
   (``<data>/negatives-test``: speech, music and city sounds, unlabelled): event F1 (sed_eval,
   onset collar 200 ms, offset collar max(200 ms, 20 %)) and frame F1 of the events the taught
   detector's decoder reports, per new class.
4. **Old classes**: frame F1 (micro over the old classes that have reference events) on the test
   split of ``--scenes`` (a train.synth folder of fold-4 ESC-10 scenes), before and after, at
   threshold 0.5 and through each checkpoint's decoder.
5. **False alarms per minute** on ``<data>/negatives-test`` (train.false_alarms' rule, what
   ``python -m train.evaluate --false-alarms`` prints), before and after.

Test audio (the held-out clips, negatives-test, the fold-4 scenes) is only ever scored, never
taught from or tuned on. Teaching freezes the trunk, so every detector here shares it: each file
goes through the CNN blocks once and through each detector's f_dil and classifier (the same
operations as its own forward). Prints a markdown summary; writes ``results.json`` and the taught
checkpoint with its model card under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtsed.audio.frontend import LogMel
from rtsed.metrics import event_scores, frame_scores
from rtsed.models.bundled import resolve_model
from rtsed.models.checkpoint import Checkpoint, load_checkpoint
from rtsed.serve.decode import decode_offline
from train.annotations import Event, events_to_frame_targets
from train.inference import InMemoryFeatures

COLLAR_S, OFFSET_FRACTION = 0.2, 0.2  # train.evaluate's event-based F1


class SharedTrunk:
    """Detectors that differ only in their classifier rows and decoders (train.teach's output and its
    source): un-normalised log-mel (T, F) -> each detector's logits (T, C_i), the CNN blocks run once."""

    def __init__(self, checkpoints: list[Checkpoint]):
        first = checkpoints[0]
        trunk = {k: v for k, v in first.model.state_dict().items() if not k.startswith("classifier.")}
        for c in checkpoints[1:]:
            other = {k: v for k, v in c.model.state_dict().items() if not k.startswith("classifier.")}
            same = trunk.keys() == other.keys() and all(torch.equal(trunk[k], other[k]) for k in trunk)
            if not same or c.config.normalization != first.config.normalization or c.config.frontend != first.config.frontend:
                raise ValueError(f"{c.path}: not the trunk, front end and normalisation of {first.path}")
        norm = first.config.normalization
        self.mean, self.std = torch.tensor(norm.mean), torch.tensor(norm.std)
        self.models = [c.model.eval() for c in checkpoints]

    @torch.no_grad()
    def logits(self, feats: np.ndarray) -> list[torch.Tensor]:
        x = ((torch.from_numpy(np.ascontiguousarray(feats)) - self.mean) / self.std)[None]
        h = self.models[0].features(x)
        return [m.temporal.logits(h, m.classifier)[0] for m in self.models]


# ------------------------------------------------------------------------------------ the split


def new_class_clips(data: Path, classes: list[str], test_clips: int, seed: int) -> dict[str, tuple[list, list]]:
    """{class: (teach clips, test clips)} from ``data``/esc50-fold4, split by recording; refuses a class
    the bundled recipe heard as an ESC-10 class or a training distractor."""
    from train.pools import load_pool

    esc10 = {c.label for c in load_pool(data / "esc10")}
    pool = load_pool(data / "esc50-fold4")
    categories = sorted({c.label for c in pool})
    training_half = set(categories[: len(categories) // 2])
    out = {}
    for name in classes:
        if name not in categories:
            raise SystemExit(f"--add {name}: not an ESC-50 fold-4 category; choose from {categories[len(categories) // 2:]}")
        if name in esc10 or name in training_half:
            raise SystemExit(f"--add {name}: the detector heard it in training (ESC-10 class or training distractor "
                             f"half); choose from {sorted(set(categories) - training_half - esc10)}")
        clips = [c for c in pool if c.label == name]
        recordings = sorted({c.recording_id for c in clips},
                            key=lambda r: hashlib.sha256(f"{seed}:{r}".encode()).hexdigest())
        held: set[str] = set()
        for r in recordings:
            if sum(c.recording_id in held for c in clips) >= test_clips:
                break
            held.add(r)
        test = [c for c in clips if c.recording_id in held]
        out[name] = ([c for c in clips if c.recording_id not in held], test)
    return out


# -------------------------------------------------------------------------------------- scoring


def decoded(probs: np.ndarray, checkpoint: Checkpoint, key: str) -> tuple[np.ndarray, list[tuple]]:
    """The checkpoint's decoder on one file: frame activity (T, C) in {0, 1} and (file, on, off, label)."""
    config = checkpoint.config
    hop = config.frontend.hop_s
    events = decode_offline(probs, config.labels, hop, config.decoder)
    activity = events_to_frame_targets([Event(key, e.onset_s, e.offset_s, e.label) for e in events],
                                       probs.shape[0], hop, config.labels)
    return activity, [(key, e.onset_s, e.offset_s, e.label) for e in events]


def heldout_scenes(data: Path, test: dict[str, list], rate: int, n: int, seed: int):
    """``n`` scenes of 60 s: held-out new-class clips and fold-4 ESC-10 clips over negatives-test's world
    (unlabelled). Yields (audio (n,), events [(label, onset_s, offset_s)])."""
    from train.mixing import MixConfig, ScenePools, mix_scene
    from train.pools import MemoryStore, load_pool, load_world, subset_by_minutes

    mix = MixConfig(scene_s=60.0, sample_rate_hz=rate, augment=None)
    events = {}
    for c in load_pool(data / "esc10"):
        if c.fold == 4:
            events.setdefault(c.label, []).append(c)
    events.update(test)
    world = subset_by_minutes(load_world([str(data / "negatives-test")]), 20.0, np.random.default_rng([seed, 5]))
    store = MemoryStore([c for cs in events.values() for c in cs] + world, rate, mix.label_db, mix.min_gap_s)
    by_category = {k: [c for c in world if c.label == k and c in store] for k in ("speech", "music", "ambience")}
    pools = ScenePools(events, {}, [], {k: v for k, v in by_category.items() if v}, ())
    for i in range(n):
        scene = mix_scene(np.random.default_rng([seed, 6, i]), mix, store, pools)
        yield scene.audio.astype(np.float32), [(label, a / rate, b / rate) for label, a, b in scene.labelled]


def score_new(taught: Checkpoint, trunk: SharedTrunk, scenes, new_labels: list[str]) -> dict[str, Any]:
    labels = list(taught.config.labels)
    hop = taught.config.frontend.hop_s
    logmel = LogMel(taught.config.frontend)
    cols = [labels.index(k) for k in new_labels]
    probs, targets, activity, reference, estimated = [], [], [], [], []
    for i, (audio, events) in enumerate(scenes):
        with torch.no_grad():
            feats = logmel(torch.from_numpy(audio)).numpy()
        p = torch.sigmoid(trunk.logits(feats)[-1]).numpy()
        key = f"heldout_{i:02d}"
        ref = [Event(key, a, b, label) for label, a, b in events]
        t = events_to_frame_targets(ref, p.shape[0], hop, labels)
        act, est = decoded(p, taught, key)
        probs.append(p[:, cols]), targets.append(t[:, cols]), activity.append(act[:, cols])
        reference += [(key, e.onset_s, e.offset_s, e.event_label) for e in ref if e.event_label in new_labels]
        estimated += [e for e in est if e[3] in new_labels]
    out = {}
    ev = event_scores(reference, estimated, new_labels, collar_s=COLLAR_S, evaluate_offset=True,
                      offset_fraction=OFFSET_FRACTION)
    ev_onset = event_scores(reference, estimated, new_labels, collar_s=COLLAR_S)
    for j, label in enumerate(new_labels):
        out[label] = {
            "reference_events": sum(r[3] == label for r in reference),
            "reported_events": sum(e[3] == label for e in estimated),
            "event_f1": ev.per_class[label].f1, "event_f1_onset": ev_onset.per_class[label].f1,
            "frame_f1_decoder": frame_scores([a[:, j:j + 1] for a in activity], [t[:, j:j + 1] for t in targets]).f1,
            "frame_f1_05": frame_scores([p[:, j:j + 1] for p in probs], [t[:, j:j + 1] for t in targets]).f1,
        }
    return out


def score_old(checkpoints: list[Checkpoint], trunk: SharedTrunk, scenes_root: Path,
              limit: int | None = None) -> list[dict[str, Any]]:
    """Frame F1 over the base's classes that have reference events in the test split (its first
    ``limit`` files), per checkpoint."""
    from train.evaluate import _items_from_args

    items, _, _ = _items_from_args(argparse.Namespace(data=str(scenes_root), test_data=None, split="test"))
    items = items[:limit]
    base = checkpoints[0]
    labels = list(base.config.labels)
    hop = base.config.frontend.hop_s
    present = sorted({e.event_label for item in items for e in item.events}, key=labels.index)
    cols = [labels.index(k) for k in present]
    features = InMemoryFeatures(base.config.frontend)
    probs: list[list[np.ndarray]] = [[] for _ in checkpoints]
    activity: list[list[np.ndarray]] = [[] for _ in checkpoints]
    targets = []
    for item in items:
        feats = features.get(Path(item.audio_path))
        for k, (c, logits) in enumerate(zip(checkpoints, trunk.logits(feats))):
            p = torch.sigmoid(logits).numpy()
            probs[k].append(p[:, cols])
            activity[k].append(decoded(p, c, str(item.audio_path))[0][:, cols])
        targets.append(events_to_frame_targets(list(item.events), len(feats), hop, labels)[:, cols])
    return [{"classes": present, "files": len(items), "frame_f1_05": frame_scores(probs[k], targets).f1,
             "frame_f1_decoder": frame_scores(activity[k], targets).f1,
             "per_class_decoder": {label: frame_scores([a[:, j:j + 1] for a in activity[k]],
                                                       [t[:, j:j + 1] for t in targets]).f1
                                   for j, label in enumerate(present)}}
            for k in range(len(checkpoints))]


def count_false_alarms(checkpoints: list[Checkpoint], trunk: SharedTrunk, folder: Path, every: int = 1,
                       scratch: Path | None = None) -> list[dict[str, Any]]:
    """train.false_alarms for every checkpoint, the trunk run once per file; with ``every`` > 1 on
    every ``every``-th file (sorted by path) only, linked under ``scratch`` by category."""
    from train.false_alarms import categorised_audio, false_alarms

    if every > 1:
        shutil.rmtree(scratch, ignore_errors=True)
        for path, category in categorised_audio(folder)[::every]:
            link = scratch / category / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
        folder = scratch

    cache: dict[Path, list[torch.Tensor]] = {}

    def logits_of(k: int):
        def logits(path: Path, feats: np.ndarray) -> torch.Tensor:
            if path not in cache:
                cache[path] = trunk.logits(feats)
            return cache[path][k]
        return logits

    return [false_alarms(c, folder, logits=logits_of(k)) for k, c in enumerate(checkpoints)]


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.teach_heldout", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", default="dnd_7_10")
    p.add_argument("--data", default="../shared/data", help="esc10/, esc50-fold4/, negatives-test/")
    p.add_argument("--world", action="append", default=[], help="teach's world pool(s) (training audio only)")
    p.add_argument("--scenes", required=True, help="a train.synth folder whose test split holds fold-4 ESC-10 scenes")
    p.add_argument("--add", action="append", default=[], help="an ESC-50 fold-4 category to teach (repeatable)")
    p.add_argument("--test-clips", type=int, default=2, help="clips per class held out from teach (whole recordings)")
    p.add_argument("--heldout-scenes", type=int, default=8)
    p.add_argument("--old-scenes", type=int, help="score the old classes on the first N test scenes only")
    p.add_argument("--fa-every", type=int, default=1, help="count false alarms on every N-th file of negatives-test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="score the taught.pt already in --out instead of teaching")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from train.teach import TeachConfig, teach

    data, out = Path(args.data), Path(args.out)
    classes = args.add or ["siren", "glass_breaking"]
    split = new_class_clips(data, classes, args.test_clips, args.seed)
    folders = {}
    for label, (train_clips, _) in split.items():
        folders[label] = out / "clips" / label
        shutil.rmtree(folders[label], ignore_errors=True)
        folders[label].mkdir(parents=True)
        for c in train_clips:
            shutil.copy2(c.path, folders[label] / c.path.name)

    cfg = TeachConfig()
    teach_time: dict[str, Any] = {}
    if not (args.reuse and (out / "taught.pt").is_file()):
        usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        teach(args.source, folders, out / "taught.pt", world=args.world, cfg=cfg, progress=False,
              command="benchmarks.teach_heldout")
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        teach_time = {"wall_s": time.perf_counter() - wall0,
                      "cpu_s": (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)}
        print(f"teach: {teach_time['wall_s'] / 60:.1f} min wall, {teach_time['cpu_s'] / 60:.1f} min CPU", flush=True)

    base, taught = load_checkpoint(resolve_model(args.source)), load_checkpoint(out / "taught.pt")
    teach_time["stages_s"] = taught.metadata["taught"]["timings_s"]
    trunk = SharedTrunk([base, taught])
    rate = base.config.frontend.sample_rate_hz
    new = score_new(taught, trunk, heldout_scenes(data, {k: v[1] for k, v in split.items()}, rate,
                                                  args.heldout_scenes, args.seed), classes)
    print("new classes on held-out scenes:", json.dumps(new), flush=True)
    old = score_old([base, taught], trunk, Path(args.scenes), args.old_scenes)
    print("old classes before/after:", json.dumps([{k: v for k, v in o.items() if k != "per_class_decoder"} for o in old]),
          flush=True)
    fa = count_false_alarms([base, taught], trunk, data / "negatives-test", args.fa_every, out / "negatives-subset")
    results = {
        "command": "python -m benchmarks.teach_heldout " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch_threads": torch.get_num_threads(), "teach_settings": cfg.__dict__ | {"world": args.world},
        "split": {k: {"teach": [c.filename for c in v[0]], "test": [c.filename for c in v[1]]} for k, v in split.items()},
        "teach_time": teach_time, "validation": taught.metadata["taught"]["validation"], "new_classes_heldout": new,
        "old_classes": {"before": old[0], "after": old[1]},
        "false_alarms": {"every_nth_file": args.fa_every,
                         "before": {k: fa[0][k] for k in ("minutes", "files", "false_alarms", "per_minute", "per_label")},
                         "after": {k: fa[1][k] for k in ("minutes", "files", "false_alarms", "per_minute", "per_label")}},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    print(summary(results))
    return 0


def summary(r: dict[str, Any]) -> str:
    counts = ", ".join(f"{k}: {len(v['teach'])} clips to teach, {len(v['test'])} held out" for k, v in r["split"].items())
    t = r["teach_time"]
    lines = [f"teach ({counts}): " + (f"{t['wall_s'] / 60:.1f} min wall, {t['cpu_s'] / 60:.1f} min CPU" if "wall_s" in t else "reused"), "",
             "| new class | held-out events | event F1 | onset-only F1 | frame F1 (decoder) | frame F1 (0.5) |",
             "|---|---|---|---|---|---|"]
    for label, s in r["new_classes_heldout"].items():
        lines.append(f"| {label} | {s['reference_events']} | {s['event_f1']:.3f} | {s['event_f1_onset']:.3f} | "
                     f"{s['frame_f1_decoder']:.3f} | {s['frame_f1_05']:.3f} |")
    b, a = r["old_classes"]["before"], r["old_classes"]["after"]
    fb, fa = r["false_alarms"]["before"], r["false_alarms"]["after"]
    lines += ["", "| | before | after |", "|---|---|---|",
              f"| old classes' frame F1, decoder ({b['files']} test scenes) | {b['frame_f1_decoder']:.3f} | {a['frame_f1_decoder']:.3f} |",
              f"| old classes' frame F1, 0.5 | {b['frame_f1_05']:.3f} | {a['frame_f1_05']:.3f} |",
              f"| false alarms per minute, negatives-test ({fb['files']} files, {fb['minutes']:.1f} min) | "
              f"{fb['per_minute']:.2f} | {fa['per_minute']:.2f} |"]
    return "\n".join(lines)


if __name__ == "__main__":
    from rtsed.backends.allocator import ensure_caching_allocator

    ensure_caching_allocator()
    sys.exit(main())
