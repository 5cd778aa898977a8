"""On-the-fly training: the cost of producing a batch of fresh scenes against the train step it
feeds, side by side (issue 15: producing a batch must cost less than the step).

    python -m benchmarks.batch_vs_step --events ../shared/data/esc10 --distractors ../shared/data/esc50-fold4 \\
        --world ../pool --world ../shared/data/fsdd-train
    python -m benchmarks.batch_vs_step --procedural          # made-up pools (no data needed)

Three measurements, each over ``--batches`` batches of ``--batch`` scenes of ``--frames`` frames:

1. **make**: one process (one thread, as a DataLoader worker runs) mixing, augmenting and
   computing log-mel for a batch (train.onthefly.OnTheFlyScenes, default MixConfig and
   AugmentConfig);
2. **step**: train.fit's train_step on such batches (forward, masked BCE, backward, Adam) at
   torch's thread count;
3. **loop**: both together as train.fit runs them, with ``--workers`` DataLoader processes
   (each count listed): seconds per batch of the whole loop and of the step's wait for data.

Re-executes under a caching allocator like the other benchmarks.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rtsed.backends.allocator import ensure_caching_allocator, loaded_allocator
from rtsed.config import FrontendConfig, ModelConfig
from rtsed.models.model import SEDModel


def _procedural_pools(root: Path) -> tuple[str, tuple[str, ...]]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from procedural import write_event_pool, write_world_pool

    return str(write_event_pool(root / "events", per_fold=4)), (str(write_world_pool(root / "world")),)


def run(args: argparse.Namespace) -> list[tuple[str, float, str]]:
    from train.augment import AugmentConfig
    from train.fit import Recipe, train_step, training_batches
    from train.mixing import MixConfig
    from train.onthefly import OnTheFlyScenes, SceneMixer, Sources, scene_seconds

    tmp = None
    if args.procedural:
        tmp = tempfile.TemporaryDirectory()
        events, world = _procedural_pools(Path(tmp.name))
        distractors = None
    else:
        events, world, distractors = args.events, tuple(args.world), args.distractors
    fe = FrontendConfig.for_rate(16000)
    mix = MixConfig(scene_s=scene_seconds(fe, args.frames), augment=AugmentConfig())
    t0 = time.perf_counter()
    mixer = SceneMixer(Sources(pool=events, distractors=distractors, world=world,
                               world_minutes=args.world_minutes), mix, seed=0)
    load_s = time.perf_counter() - t0
    n_scenes = args.batch * args.batches
    data = OnTheFlyScenes(mixer, fe, None, 0, n_scenes, args.frames, mix.augment)
    data.set_norm(data.statistics(4))
    print(mixer.summary())
    print(f"pools loaded in {load_s:.1f} s; torch threads {torch.get_num_threads()}; allocator {loaded_allocator()}")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    make = []
    batches = []
    for b in range(args.batches):
        t = time.perf_counter()
        items = [data[i] for i in range(b * args.batch, (b + 1) * args.batch)]
        make.append(time.perf_counter() - t)
        batches.append(tuple(torch.stack(t) for t in list(zip(*items))[:3]))
    torch.set_num_threads(threads)

    config = ModelConfig.from_name(args.model, n_classes=len(mixer.labels), n_mels=fe.n_mels)
    model = SEDModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    train_step(model, optimizer, *batches[0])  # warm-up (native kernels, allocator)
    step = []
    for x, y, mask in batches:
        t = time.perf_counter()
        train_step(model, optimizer, x, y, mask)
        step.append(time.perf_counter() - t)

    rows = [("make a batch (1 process, 1 thread)", statistics.median(make), "s per batch"),
            (f"train step ({args.model}, {threads} threads)", statistics.median(step), "s per batch")]
    for workers in args.workers:
        recipe = Recipe(batch_size=args.batch, sequence_frames=args.frames, workers=workers)
        timing = {"make_s": 0.0, "wait_s": 0.0, "step_s": 0.0, "n": 0}
        order = [list(range(b * args.batch, (b + 1) * args.batch)) for b in range(args.batches)]
        t = time.perf_counter()
        for x, y, mask in training_batches(data, order, 0, 1, recipe, mix, torch.device("cpu"), timing):
            s = time.perf_counter()
            train_step(model, optimizer, x, y, mask)
            timing["step_s"] += time.perf_counter() - s
        total = (time.perf_counter() - t) / args.batches
        rows.append((f"train.fit loop, {workers} worker(s): whole loop", total, "s per batch"))
        rows.append((f"train.fit loop, {workers} worker(s): step waits for data", timing["wait_s"] / args.batches,
                     "s per batch"))
        rows.append((f"train.fit loop, {workers} worker(s): train step", timing["step_s"] / args.batches,
                     "s per batch"))
        rows.append((f"train.fit loop, {workers} worker(s): making (worker time)", timing["make_s"] / args.batches,
                     "s per batch"))
    if tmp is not None:
        tmp.cleanup()
    return rows


def main(argv: list[str] | None = None) -> list[tuple[str, float, str]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch_vs_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", default="../shared/data/esc10")
    p.add_argument("--distractors")
    p.add_argument("--world", action="append", default=[])
    p.add_argument("--world-minutes", type=float, default=120.0)
    p.add_argument("--procedural", action="store_true", help="made-up pools in a temporary folder")
    p.add_argument("--model", default="dnd_7_10")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--frames", type=int, default=1024)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    args = p.parse_args(argv)
    if argv is None:
        ensure_caching_allocator()
    rows = run(args)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}}  seconds")
    for name, value, unit in rows:
        print(f"{name:<{width}}  {value:7.3f} {unit}")
    make, step = rows[0][1], rows[1][1]
    print(f"\nmaking a batch costs {make / step:.2f} x the train step it feeds")
    return rows


if __name__ == "__main__":
    main()
