"""A false-alarm folder for tuning, from the world audio that no training scene has heard.

    python -m train.heldout_world --scenes runs/scenes12 --world ../pool --world ../shared/data/fsdd-train \\
        --out runs/fa-validate --minutes-per-category 20

train.synth holds whole world groups (a speaker, an album, a sound pack) out of training and lets
only the validation scenes hear them (``world_groups`` in the scenes' manifest). Those groups'
clips, alone, are audio in which no target class sounds, held out from training like the
validation scenes themselves: ``train.tune --false-alarms`` can choose decoders on them, leaving
test-only folders (``negatives-test``) for measuring. The folder holds links to the clips under
their pool paths and a ``meta.csv`` with their categories, the layout train.false_alarms reads.

``--minutes-per-category`` keeps about that much of each category (speech, music, ambience):
every n-th clip of the category's sorted list, n = ceil(its minutes / the budget), so that one
long album does not decide the false-alarm rate alone and every group is sampled.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

from train.pools import MixError, load_world

META_COLUMNS = ("filename", "category", "source", "group", "duration_s", "license", "attribution")


class HeldOutWorldError(ValueError):
    """A folder that cannot be built; the message names the problem and the fix."""


def held_out_groups(scenes: Path, split: str) -> list[str]:
    """The world groups (``<source>/<group>``) that feed ``split``'s scenes, from the manifest."""
    manifest = scenes / "manifest.json"
    if not manifest.is_file():
        raise HeldOutWorldError(f"--scenes {scenes}: no manifest.json; give a train.synth output folder")
    groups = json.loads(manifest.read_text(encoding="utf-8")).get("world_groups", {})
    if split not in groups:
        raise HeldOutWorldError(f"{manifest}: no world groups for split {split!r} (it has {sorted(groups)}); "
                                "synthesise the scenes with --world so that groups are held out")
    if split == "train":
        raise HeldOutWorldError("--split train: those groups are trained on; give validate")
    return list(groups[split])


def build(scenes: Path, worlds: list[Path], out: Path, split: str = "validate",
          minutes_per_category: float | None = None) -> list[dict]:
    """Write the folder (links and meta.csv); returns its meta rows."""
    wanted = set(held_out_groups(scenes, split))
    try:
        clips = [c for c in load_world([str(w) for w in worlds]) if c.recording_id in wanted]
    except MixError as exc:
        raise HeldOutWorldError(str(exc)) from exc
    found = {c.recording_id for c in clips}
    if wanted - found:
        raise HeldOutWorldError(f"world groups {sorted(wanted - found)[:5]} of split {split!r} are in none of "
                                f"--world {[str(w) for w in worlds]}; pass the pools the scenes were made from")
    if out.exists() and any(out.iterdir()):
        raise HeldOutWorldError(f"--out {out}: exists and is not empty; give a new folder")
    rows = []
    for category in sorted({c.label for c in clips}):
        chosen = sorted((c for c in clips if c.label == category), key=lambda c: str(c.path))
        durations = [_duration_s(c) for c in chosen]
        if minutes_per_category is not None:
            budget_s, total_s = 60.0 * minutes_per_category, sum(durations)
            stride = max(1, math.ceil(total_s / budget_s))  # at most the budget, from the whole list
            picked = list(zip(chosen, durations))[::stride]
        else:
            picked = list(zip(chosen, durations))
        for clip, d in picked:
            name = Path(clip.source_dataset) / clip.filename
            link = out / name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(clip.path.resolve(), link)
            source, group = clip.recording_id.split("/", 1)
            rows.append({"filename": name.as_posix(), "category": category, "source": source, "group": group,
                         "duration_s": f"{d:.3f}", "license": clip.license, "attribution": clip.author})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "meta.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=META_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _duration_s(clip) -> float:
    import soundfile as sf

    return float(sf.info(str(clip.path)).duration)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.heldout_world", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", required=True, type=Path, help="the train.synth folder whose manifest names the groups")
    p.add_argument("--world", required=True, type=Path, action="append", help="a world pool (meta.csv); repeat")
    p.add_argument("--split", default="validate", help="whose held-out groups to take (default validate)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--minutes-per-category", type=float, default=None,
                   help="keep about this many minutes per category (default: all)")
    args = p.parse_args(argv)
    try:
        rows = build(args.scenes, args.world, args.out, args.split, args.minutes_per_category)
    except HeldOutWorldError as exc:
        print(f"train.heldout_world: {exc}", file=sys.stderr)
        return 2
    minutes: dict[str, float] = {}
    for r in rows:
        minutes[r["category"]] = minutes.get(r["category"], 0.0) + float(r["duration_s"]) / 60
    summary = ", ".join(f"{c} {m:.1f} min" for c, m in sorted(minutes.items()))
    print(f"wrote {args.out}: {len(rows)} clips of split {args.split!r}'s held-out world groups ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
