"""``python -m train.bundle``: ship a trained detector inside the package, with its model card.

    python -m train.bundle --model runs/dnd_7_10/tuned.pt --name dnd_7_10 \\
        --test scenes/ --test-world scenes-world/ --false-alarms ../shared/data/negatives-test \\
        --last runs/dnd_7_10/last.pt --command "python -m train.synth ..." --command "python -m train.fit ..."

Scores the checkpoint as the field does (``train.evaluate``: frame F1/ER, segment F1/ER, event F1
with onset and offset collars and onset-only, PSDS1, PSDS2, per class), on the test split of
``--test`` (the fold-4 test scenes) and of ``--test-world`` (fold-4 scenes over held-out real speech
and music), and counts false alarms per minute on ``--false-alarms`` (audio in which no target
class sounds). It measures the streaming compute per hop on this machine, and writes
``rtsed/models/<name>.pt`` plus ``rtsed/models/<name>.md`` (classes, data sources and licences, the
command lines of the recipe, training progress, the decoder, every score, latency). The audio the
weights derive from is credited in ``rtsed/models/ATTRIBUTION.md``. With ``--int8-calibration DIR``
it also ships the int8 step graph beside them (``train.bundle_int8``).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtsed.models.bundled import BUNDLED_DIR
from rtsed.models.checkpoint import load_checkpoint, save_checkpoint


def measure_compute(checkpoint_path: Path, backend: str, seconds: float = 20.0, frames_per_step: int = 4) -> float:
    """Milliseconds of compute per 20 ms hop, one stream, one thread, on a noise signal."""
    from rtsed.serve.engine import DetectionEngine, make_stepper

    stepper, config, _ = make_stepper(checkpoint_path, backend, threads=1)
    engine = DetectionEngine(stepper, config, frames_per_step=frames_per_step)
    rate = config.frontend.sample_rate_hz
    audio = (0.05 * np.random.default_rng(0).standard_normal(int(seconds * rate))).astype(np.float32)
    block = config.frontend.hop_samples
    engine.push_audio(audio[: rate * 2])  # warm-up
    engine.stats.compute_s, engine.stats.frames = 0.0, 0
    for start in range(rate * 2, audio.shape[0], block):
        engine.push_audio(audio[start:start + block])
    return engine.stats.compute_ms_per_hop()


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def run_progress(path: str | None) -> dict:
    """The training run's progress record (epochs run, best epoch, history) from its last-state
    file (train.fit's last.pt): the best checkpoint only knows the epochs up to itself."""
    if not path:
        return {}
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != "rtsed-train-state":
        raise SystemExit(f"{path} is not a train.fit last-state file (format rtsed-train-state)")
    return {**state["progress"], "budget": state["recipe"].get("epochs")}


# ------------------------------------------------------------------------------------ score tables


def _point(results: dict, name: str) -> dict | None:
    for p in results["operating_points"]:
        if p["name"] == name:
            return p
    return None


def _score_rows(results: dict) -> list[str]:
    ps1, ps2 = results["psds1"]["psds"], results.get("psds2", {}).get("psds")
    # The decoder's row: PSDS of the smoothed scores it thresholds (the model's where it was not computed).
    dec1 = results.get("psds1_decoder", {}).get("psds", ps1)
    dec2 = results.get("psds2_decoder", {}).get("psds", ps2)
    rows = ["| decoding | frame F1 | frame ER | segment F1 | segment ER | event F1 | event F1, onset only | PSDS1 | PSDS2 |",
            "|---|---|---|---|---|---|---|---|---|"]
    for p in results["operating_points"]:
        f, s, e = p["frame"], p["segment"], p["event"]
        eo = p.get("event_onset", {})
        title = "**events a user gets** (the decoder below)" if p["threshold"] == "decoder" else (
            f"threshold {p['threshold']}" if not isinstance(p["threshold"], list) else "on-thresholds, no smoothing")
        rows.append(f"| {title} | {_num(f['f1'])} | {_num(f['error_rate'])} | {_num(s['f1'])} | {_num(s['error_rate'])} "
                    f"| {_num(e['f1'])} | {_num(eo.get('f1'))} "
                    + (f"| {_num(dec1)} | {_num(dec2)} |" if p["threshold"] == "decoder" else f"| {_num(ps1)} | {_num(ps2)} |"))
    return rows


def _class_rows(results: dict) -> list[str]:
    point = _point(results, "live decoder") or results["operating_points"][-1]
    rows = ["| class | ref events | frame F1 | frame ER | segment F1 | event F1 | event F1, onset only | PSDS1 | PSDS2 |",
            "|---|---|---|---|---|---|---|---|---|"]
    for label, pc in point["per_class"].items():
        rows.append(f"| {label} | {pc['event'].get('n_ref', '-')} | {_num(pc['frame'].get('f1'))} "
                    f"| {_num(pc['frame'].get('error_rate'))} | {_num(pc['segment'].get('f1'))} "
                    f"| {_num(pc['event'].get('f1'))} | {_num(pc.get('event_onset', {}).get('f1'))} "
                    f"| {_num(pc.get('psds1'))} | {_num(pc.get('psds2'))} |")
    return rows


def _decoder_rows(cfg) -> list[str]:
    n = len(cfg.labels)
    dec = cfg.decoder
    on, off = dec.thresholds(n)
    k = dec.per_class("smoothing_frames", n)
    ev, gap = dec.per_class("min_event_s", n), dec.per_class("min_gap_s", n)
    rows = ["| class | median window (frames) | on | off | min event (s) | min gap (s) |", "|---|---|---|---|---|---|"]
    rows += [f"| {c} | {k[i]} | {on[i]:.2f} | {off[i]:.2f} | {ev[i]:g} | {gap[i]:g} |" for i, c in enumerate(cfg.labels)]
    return rows


def _false_alarm_rows(fa: dict) -> list[str]:
    rows = [f"{fa['false_alarms']} target-class events in {fa['minutes']:.1f} minutes of {fa['files']} files: "
            f"**{fa['per_minute']:.2f} false alarms per minute** ({fa['rule']}).", "",
            "| category | files | minutes | false alarms | per minute |", "|---|---|---|---|---|"]
    rows += [f"| {c} | {r['files']} | {r['minutes']:.1f} | {r['false_alarms']} | {r['per_minute']:.2f} |"
             for c, r in fa["per_category"].items()]
    reported = [(label, r) for label, r in fa["per_label"].items() if r["false_alarms"]]
    if reported:
        rows += ["", "False alarms by reported label: " + ", ".join(
            f"{label} {r['false_alarms']} ({r['per_minute']:.2f}/min)" for label, r in reported) + "."]
    return rows


# ---------------------------------------------------------------------------------- attribution


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def world_sources(roots: list[str]) -> list[tuple[str, str, str, float]]:
    """(source, licence, attribution, minutes) of every world pool (meta.csv with source, license,
    attribution, duration_s columns), one row per source and licence."""
    minutes: Counter[tuple[str, str, str]] = Counter()
    for root in roots:
        meta = Path(root) / "meta.csv"
        if not meta.is_file():
            continue
        for row in _read_csv(meta):
            key = (row.get("source", ""), row.get("license", ""), row.get("attribution", ""))
            minutes[key] += float(row.get("duration_s") or 0) / 60
    # One attribution text per (source, licence): the pool's rows repeat it per voice or track.
    merged: dict[tuple[str, str], tuple[set[str], float]] = {}
    for (source, lic, attr), m in minutes.items():
        texts, total = merged.get((source, lic), (set(), 0.0))
        texts.add(attr)
        merged[(source, lic)] = (texts, total + m)
    return sorted((s, lic, "; ".join(sorted(t))[:400], m) for (s, lic), (t, m) in merged.items())


def event_clips(onthefly: dict | None, manifests: list[dict]) -> list[tuple[str, str, str, str]]:
    """(data set, author, URL, licence) of every event and distractor clip the weights derive from:
    the on-the-fly training pools' training folds and the scenes' manifests (validation and test)."""
    rows: set[tuple[str, str, str, str]] = set()
    for manifest in manifests:
        for a in manifest.get("attribution", []):
            rows.add((a.get("source_dataset", ""), a.get("author", ""), a.get("url", ""), a.get("license", "")))
    if onthefly:
        from train.pools import filter_licenses, load_pool

        sources = onthefly.get("sources", {})
        licenses = tuple(sources.get("licenses") or ()) or None
        folds = set((sources.get("folds") or [[1, 2]])[0])
        for key in ("pool", "distractors"):
            root = sources.get(key)
            if root and Path(root).is_dir():
                for clip in filter_licenses(load_pool(root), licenses):
                    if key == "distractors" or clip.fold in folds:
                        rows.add((clip.source_dataset, clip.author, clip.url, clip.license))
    return sorted(rows)


def attribution(clips: list[tuple[str, str, str, str]], world: list[tuple[str, str, str, float]]) -> str:
    lines = ["# Attribution", "",
             "The bundled detectors' weights derive from the audio below. Thank you to its authors.", "",
             "## Sound events: ESC-10 / ESC-50 (Freesound recordings)", "",
             "K. J. Piczak, *ESC: Dataset for Environmental Sound Classification*, ACM Multimedia 2015. "
             "Only clips whose own Freesound licence is CC0 or CC-BY were used.", "",
             "| data set | author | recording | licence |", "|---|---|---|---|"]
    lines += [f"| {d} | {a} | {u} | {lic} |" for d, a, u, lic in clips]
    if world:
        lines += ["", "## Speech, music and everyday sound (the training pool, Debian packages; FSDD)", "",
                  "| source | licence | minutes | attribution |", "|---|---|---|---|"]
        lines += [f"| {s} | {lic} | {m:.1f} | {attr} |" for s, lic, attr, m in world]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ model card


def _tuning_objective(meta: dict) -> str:
    """What train.tune maximised, in words, from the tuned checkpoint's metadata."""
    objective = meta.get("tuning_objective", "event_f1").replace("_", " ").replace("f1", "F1")
    if meta.get("tuning_max_fa_per_min") is not None:
        return (f"{objective} with at most {meta['tuning_max_fa_per_min']:g} false alarms per minute per class on "
                f"held-out world audio ({meta.get('tuning_fa_minutes', 0):.0f} min, `--false-alarms`)")
    if meta.get("tuning_fa_weight"):
        return (f"{objective} less {meta['tuning_fa_weight']:g} per false alarm per minute on held-out world "
                f"audio ({meta.get('tuning_fa_minutes', 0):.0f} min, `--false-alarms`, no training scene heard it)")
    return objective


def model_card(name: str, ckpt, test: dict, test_world: dict | None, false_alarms: dict | None,
               commands: list[str], latency: dict, progress: dict, world: list[tuple[str, str, str, float]]) -> str:
    cfg = ckpt.config
    fe = cfg.frontend
    meta = ckpt.metadata
    history = progress.get("history") or meta.get("history", [])
    seconds = [h["seconds"] for h in history if "seconds" in h]
    lines = [
        f"# {name}: model card",
        "",
        f"A `{cfg.model.name}` sound event detector (Drossos et al. 2020, depthwise-separable + dilated "
        f"convolutions), {cfg.model.padding} time padding, {test['model']['parameters']:,} parameters, "
        f"{len(cfg.labels)} classes. Use: `python -m rtsed.live --model {name}.pt`.",
        "",
        "## Classes",
        "",
        ", ".join(f"`{c}`" for c in cfg.labels),
        "",
        "`speech` is labelled by its audible extent, `music` over the whole span it plays (a bed).",
        "",
        "## Data and licences",
        "",
        "- **Sound events**: ESC-10 (CC BY 3.0) and, as unlabelled distractors, ESC-50 fold 4 (CC BY-NC 3.0) "
        "(K. J. Piczak, ACM Multimedia 2015, doi:10.1145/2733373.2806390); excerpts of Freesound recordings, "
        "only clips whose own licence is CC0 or CC-BY. ESC-10 folds 1-2 train, fold 3 validates, fold 4 tests; "
        "the ESC-50 categories are split in two halves, one for training, one for validation and test.",
        "- **Speech, music and everyday sound**: the training pool built from Debian packages "
        "(`../shared/tools/negatives/`) and the Free Spoken Digit Dataset's training speakers; validation "
        "scenes use groups (speakers, albums, packages) held out from training. Per source:",
        "",
        "| source | licence | minutes |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {lic} | {m:.1f} |" for s, lic, _, m in world]
    lines += [
        "",
        "- **Test only, never trained on or tuned on**: `negatives-test` (real speech, music and city sound "
        "from speakers, albums and packages disjoint from the pool; CC-BY-SA-3.0, GPL-2+, CC-BY-SA-4.0).",
        "",
        "Every clip and source, with authors and licences, is listed in `ATTRIBUTION.md` beside this card: "
        "check that your use fits those licences (ESC-50's is non-commercial).",
        "",
        "## Recipe",
        "",
        "```",
        *commands,
        "```",
        "",
        f"Training scenes are mixed afresh every epoch (`train.onthefly`, reproducible from seed, epoch and "
        f"index); validation and test scenes are fixed files. The kept weights are those of the best "
        f"validation event F1 ({meta.get('select', 'event_f1')}): epoch {meta.get('epoch')}"
        + (f" (validation event F1 {meta['val_event_f1']:.3f})" if meta.get("val_event_f1") is not None else "")
        + f"; epochs run: {progress.get('epoch', len(history))}"
        + (f" of a {progress['budget']}-epoch budget" if progress.get("budget") else "")
        + (f", {np.median(seconds):.0f} s per epoch (median; 2-core CPU)" if seconds else "")
        + f". Front end: {fe.sample_rate_hz} Hz, {fe.window_samples}-sample Hamming window, "
        f"{fe.hop_samples}-sample hop, {fe.n_mels} log-mel bands; per-band normalisation from the training "
        "scenes (in the checkpoint).",
        "",
        "## Decoder",
        "",
        "Chosen per class on the validation scenes to maximise " + _tuning_objective(meta)
        + " (`python -m train.tune`): a median over the window (its delay is compensated in the reported times and counted in the latency), "
        "hysteresis thresholds, then minimum event and gap durations. `rtsed.live`, `rtsed.detect` and the "
        "engines use it as is; `--threshold LABEL=ON[:OFF]` overrides a class.",
        "",
        *_decoder_rows(cfg),
        "",
        f"## Test scores: fold-4 scenes ({test['data']['n_files']} scenes, {test['data']['hours']:.2f} h, "
        f"{test['data']['n_events']} events)",
        "",
        "`python -m train.evaluate`: frame F1/ER as the paper (20 ms frames), segment F1/ER on 1 s segments, "
        "event F1 as DCASE scores it (onset within 200 ms, offset within max(200 ms, 20 %); sed_eval) and "
        "onset-only, PSDS1 and PSDS2 (sed_scores_eval; threshold-free). The row in bold scores what a user "
        "gets: the events of the decoder above; its PSDS are those of the median-smoothed scores the decoder "
        "thresholds, the other rows' those of the model's probabilities.",
        "",
        *_score_rows(test),
        "",
        "Per class, the events a user gets:",
        "",
        *_class_rows(test),
    ]
    if test_world is not None:
        lines += [
            "",
            f"## Test scores: fold-4 scenes over real speech and music ({test_world['data']['n_files']} scenes, "
            f"{test_world['data']['hours']:.2f} h, {test_world['data']['n_events']} events)",
            "",
            "Fold-4 events over backgrounds of `negatives-test` speech and music (never trained or tuned on).",
            "",
            *_score_rows(test_world),
            "",
            *_class_rows(test_world),
        ]
    if false_alarms is not None:
        lines += ["", "## False alarms on sound it never heard", "", *_false_alarm_rows(false_alarms)]
    lines += [
        "",
        "## Latency",
        "",
        f"- algorithmic: {latency['algorithmic_ms']:.0f} ms: the {fe.window_s * 1000:.0f} ms window, "
        f"{cfg.model.lookahead_frames} frames of model lookahead and {latency['smoother_frames']} frames of "
        f"median-smoother delay (worst class) at {fe.hop_s * 1000:.0f} ms; the live tool adds its buffering of "
        "frames per step and the resampler's delay, and an onset is reported once it has lasted its class's "
        "minimum event duration;",
        f"- compute per 20 ms hop, one stream, one thread, 4 frames per step: torch {latency['torch_ms']:.2f} ms, "
        f"onnxruntime {latency['onnx_ms']:.2f} ms ({latency['machine']}).",
        "",
        f"Written by `python -m train.bundle` on {time.strftime('%Y-%m-%d')}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from train.data_sources import open_dataset
    from train.evaluate import evaluate
    from train.false_alarms import false_alarms as count_false_alarms

    p = argparse.ArgumentParser(prog="python -m train.bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="tuned checkpoint")
    p.add_argument("--name", required=True, help="bundled name, e.g. dnd_7_10")
    p.add_argument("--test", required=True, help="train.synth folder whose test split is the fold-4 test scenes")
    p.add_argument("--test-world", help="train.synth folder whose test split lies over held-out speech and music")
    p.add_argument("--false-alarms", metavar="DIR", help="audio in which no target class sounds (e.g. negatives-test)")
    p.add_argument("--command", action="append", default=[], help="a command line of the recipe (repeat, in order)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--last", help="the run's last-state file (train.fit's last.pt): epochs run for the card")
    p.add_argument("--json", help="also write every evaluation as JSON here")
    p.add_argument("--int8-calibration", metavar="DIR",
                   help="also ship the int8 step graph, calibrated on this training-side audio (train.bundle_int8)")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.model)

    def test_split(root: str) -> tuple[list, dict]:
        ns = argparse.Namespace(data=root, train_data=None, val_data=None, test_data=None, labels=None)
        manifest_path = Path(root) / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        return open_dataset(ns).split("test"), manifest

    items, manifest = test_split(args.test)
    results = {"test": evaluate(ckpt, items, cache_dir=args.cache_dir, data=args.test, split="test")}
    manifests = [manifest]
    if args.test_world:
        items, manifest_world = test_split(args.test_world)
        manifests.append(manifest_world)
        results["test_world"] = evaluate(ckpt, items, cache_dir=args.cache_dir, data=args.test_world, split="test")
    if args.false_alarms:
        results["false_alarms"] = count_false_alarms(ckpt, args.false_alarms)
    cfg = ckpt.config
    n = len(cfg.labels)
    smoother = cfg.decoder.smoothing_delay_frames(n)
    latency = {
        "algorithmic_ms": 1000 * (cfg.frontend.window_s + (cfg.model.lookahead_frames + smoother) * cfg.frontend.hop_s),
        "smoother_frames": smoother,
        "torch_ms": measure_compute(Path(args.model), "torch"),
        "onnx_ms": measure_compute(Path(args.model), "onnx"),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, measured by train.bundle",
    }
    onthefly = ckpt.metadata.get("onthefly")
    world_roots = list((onthefly or {}).get("sources", {}).get("world", []) or [])
    world = world_sources(world_roots)
    BUNDLED_DIR.mkdir(parents=True, exist_ok=True)
    target = BUNDLED_DIR / f"{args.name}.pt"
    # Keep the shipped file small and self-describing: the per-epoch history stays in the run folder.
    metadata = {k: v for k, v in ckpt.metadata.items() if k != "history"}
    progress = run_progress(args.last)
    metadata["epochs_run"] = progress.get("epoch", len(ckpt.metadata.get("history", [])))
    metadata["test_summary"] = results["test"]["summary"]
    if "test_world" in results:
        metadata["test_world_summary"] = results["test_world"]["summary"]
    if "false_alarms" in results:
        metadata["false_alarms_per_minute"] = results["false_alarms"]["per_minute"]
    save_checkpoint(target, ckpt.model, cfg, metadata)
    card = model_card(args.name, ckpt, results["test"], results.get("test_world"), results.get("false_alarms"),
                      args.command, latency, progress, world)
    (BUNDLED_DIR / f"{args.name}.md").write_text(card)
    (BUNDLED_DIR / "ATTRIBUTION.md").write_text(attribution(event_clips(onthefly, manifests), world))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.int8_calibration:
        from train.bundle_int8 import ship

        ship(args.name, args.int8_calibration)
    summary = results["test"]["summary"]
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB) and its model card; test: "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float))
          + (f"; false alarms {results['false_alarms']['per_minute']:.2f}/min" if "false_alarms" in results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
