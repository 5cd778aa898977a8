"""``python -m train.bundle``: ship a trained detector inside the package, with its model card.

    python -m train.bundle --model runs/dnd_7_10/tuned.pt --name dnd_7_10 --data scenes/ \\
        --train-command "python -m train.fit ..."

Evaluates the checkpoint on the test split (frame F1/ER, segment F1/ER, event F1, PSDS1, at 0.5
and at the tuned thresholds), measures streaming compute per hop on this machine, and writes
``rtsed/models/<name>.pt`` plus ``rtsed/models/<name>.md`` (classes, data and licence attribution,
the training command, scores, latency). Every clip the scenes were mixed from is credited in
``rtsed/models/ATTRIBUTION.md`` (from the synthesis manifest).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

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


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _row(point: dict, psds: float | None) -> str:
    f, s, e = point["frame"], point["segment"], point["event"]
    return (f"| {point['name']} | {f['f1']:.3f} | {f['error_rate']:.3f} | {s['f1']:.3f} | {s['error_rate']:.3f} "
            f"| {e['f1']:.3f} | {psds:.3f} |")


def run_progress(path: str | None) -> dict:
    """The training run's progress record (epochs run, best epoch, history) from its last-state
    file (train.fit's last.pt): the best checkpoint only knows the epochs up to itself."""
    if not path:
        return {}
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != "rtsed-train-state":
        raise SystemExit(f"{path} is not a train.fit last-state file (format rtsed-train-state)")
    return {**state["progress"], "budget": state["recipe"].get("epochs")}


def model_card(name: str, ckpt, results: dict, manifest: dict, train_command: str, latency: dict,
               progress: dict | None = None) -> str:
    cfg = ckpt.config
    fe = cfg.frontend
    meta = ckpt.metadata
    psds = results["psds1"]["psds"]
    on = cfg.decoder.on_thresholds or (0.5,) * len(cfg.labels)
    off = cfg.decoder.off_thresholds or on
    split_info = manifest.get("splits", {})
    lines = [
        f"# {name}: model card",
        "",
        f"A `{cfg.model.name}` sound event detector (Drossos et al. 2020, depthwise-separable + dilated "
        f"convolutions), {cfg.model.padding} time padding, {results['model']['parameters']:,} parameters, "
        f"trained with rtsed on scenes synthesised from ESC-10. Use: `python -m rtsed.live --model {name}.pt`.",
        "",
        "## Classes",
        "",
        ", ".join(f"`{c}`" for c in cfg.labels),
        "",
        "## Data and licences",
        "",
        "The weights derive from audio clips of **ESC-10 and ESC-50** (K. J. Piczak, *ESC: Dataset for "
        "Environmental Sound Classification*, ACM Multimedia 2015, doi:10.1145/2733373.2806390), which are "
        "excerpts of recordings by **Freesound** authors. Only clips whose own Freesound licence is CC0 "
        "or CC-BY were used; every clip and its author, URL and licence is listed in `ATTRIBUTION.md` "
        "beside this card. ESC-10 is distributed under CC BY 3.0, ESC-50 under CC BY-NC 3.0: check that "
        "your use fits them.",
        "",
        f"Scenes: `python -m train.synth` (seed {manifest['config'].get('seed')}, "
        f"{manifest['config'].get('scene_s')} s scenes at {manifest['config'].get('sample_rate_hz')} Hz, "
        f"polyphony up to {manifest['config'].get('max_polyphony')}, pink-noise bed, ESC-50 fold-4 "
        "distractors with categories split between training and validation/test). ESC-10 folds 1-2 "
        "train, fold 3 validation, fold 4 test: no recording appears in two splits.",
        "",
        "| split | ESC-10 folds | scenes | labelled events | clips (events + distractors) |",
        "|---|---|---|---|---|",
    ]
    for split, info in split_info.items():
        scenes = info.get("scenes", [])
        clips = info.get("clips", [])
        uses = sum(c.get("uses", 1) for c in clips) if isinstance(clips, list) else "-"
        lines.append(f"| {split} | {', '.join(map(str, info.get('folds', [])))} | {len(scenes)} | "
                     f"{sum(sc.get('events', 0) for sc in scenes)} | "
                     f"{len(clips) if isinstance(clips, list) else clips} clips, {uses} uses |")
    lines += [
        "",
        "## Training",
        "",
        "```",
        train_command,
        "```",
        "",
        f"Paper recipe (Adam 1e-3, batch 16 x 1024 frames, BCE), best validation loss at epoch "
        f"{meta.get('epoch')} (val loss {meta.get('val_loss', float('nan')):.4f}); epochs run: "
        f"{(progress or {}).get('epoch', len(meta.get('history', [])))}"
        f"{' of a ' + str(progress['budget']) + '-epoch budget' if progress and progress.get('budget') else ''}"
        f". Front end: {fe.sample_rate_hz} Hz, {fe.window_samples}-sample "
        f"Hamming window, {fe.hop_samples}-sample hop, {fe.n_mels} log-mel bands; per-band normalisation "
        "from the training split (in the checkpoint).",
        "",
        "Decoder thresholds tuned per class on the validation split (`python -m train.tune`), on / off:",
        "",
        "| class | on | off |",
        "|---|---|---|",
    ]
    lines += [f"| {c} | {a:.2f} | {b:.2f} |" for c, a, b in zip(cfg.labels, on, off)]
    lines += [
        "",
        f"## Test-fold scores ({results['data']['n_files']} scenes, {results['data']['hours']:.2f} h)",
        "",
        "Frame-wise F1/ER as the paper (20 ms frames), segment-based on 1 s segments and event-based "
        "F1 with a 200 ms onset collar (sed_eval), PSDS1 (sed_scores_eval; threshold-free), all from "
        "`python -m train.evaluate`. The threshold rows decode events by a plain threshold (runs of "
        "active frames); the `live decoder` row scores the events `rtsed.live` and `rtsed.detect` "
        "report (hysteresis, minimum event and gap durations; its frame scores count the frames "
        "inside those events).",
        "",
        "| thresholds | frame F1 | frame ER | segment F1 | segment ER | event F1 | PSDS1 |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [_row(p, psds) for p in results["operating_points"]]
    lines += [
        "",
        "Per class (frame F1 at the tuned thresholds):",
        "",
        "| class | frame F1 | segment F1 | event F1 | PSDS1 |",
        "|---|---|---|---|---|",
    ]
    tuned = [p for p in results["operating_points"] if p["name"] == "decoder on_thresholds"]
    point = tuned[0] if tuned else results["operating_points"][0]
    for label in cfg.labels:
        pc = point["per_class"][label]
        lines.append(f"| {label} | {_num(pc['frame'].get('f1'))} | {_num(pc['segment'].get('f1'))} "
                     f"| {_num(pc['event'].get('f1'))} | {_num(pc.get('psds1'))} |")
    lines += [
        "",
        "## Latency",
        "",
        f"- algorithmic: {latency['algorithmic_ms']:.0f} ms (40 ms window + {cfg.model.lookahead_frames} "
        f"frames of lookahead x 20 ms), plus the live tool's buffering of frames per step and the resampler's delay;",
        f"- compute per 20 ms hop, one stream, one thread, 4 frames per step: torch {latency['torch_ms']:.2f} ms, "
        f"onnxruntime {latency['onnx_ms']:.2f} ms ({latency['machine']}).",
        "",
        f"Written by `python -m train.bundle` on {time.strftime('%Y-%m-%d')}.",
    ]
    return "\n".join(lines) + "\n"


def attribution(manifest: dict) -> str:
    rows = sorted({(a.get("source_dataset", ""), a.get("author", ""), a.get("url", ""), a.get("license", ""))
                   for a in manifest.get("attribution", [])})
    lines = ["# Attribution", "",
             "The bundled detectors' weights derive from these Freesound recordings, as excerpted in "
             "ESC-10 / ESC-50 (K. J. Piczak, ACM Multimedia 2015). Thank you to their authors.", "",
             "| data set | author | recording | licence |", "|---|---|---|---|"]
    lines += [f"| {d} | {a} | {u} | {lic} |" for d, a, u, lic in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from train.data_sources import open_dataset
    from train.evaluate import evaluate

    p = argparse.ArgumentParser(prog="python -m train.bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="tuned checkpoint")
    p.add_argument("--name", required=True, help="bundled name, e.g. dnd_7_10")
    p.add_argument("--data", required=True, help="the train.synth folder it was trained on")
    p.add_argument("--train-command", required=True)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--last", help="the run's last-state file (train.fit's last.pt): epochs run for the card")
    p.add_argument("--json", help="also write the test evaluation as JSON here")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.model)
    args.train_data = args.val_data = args.test_data = None
    args.labels = None
    dataset = open_dataset(args)
    results = evaluate(ckpt, dataset.split("test"), cache_dir=args.cache_dir, data=args.data, split="test")
    manifest = json.loads((Path(args.data) / "manifest.json").read_text())
    latency = {
        "algorithmic_ms": 1000 * (ckpt.config.frontend.window_s + ckpt.config.model.lookahead_frames * ckpt.config.frontend.hop_s),
        "torch_ms": measure_compute(Path(args.model), "torch"),
        "onnx_ms": measure_compute(Path(args.model), "onnx"),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, measured by train.bundle",
    }
    BUNDLED_DIR.mkdir(parents=True, exist_ok=True)
    target = BUNDLED_DIR / f"{args.name}.pt"
    # Keep the shipped file small and self-describing: the per-epoch history stays in the run folder.
    metadata = {k: v for k, v in ckpt.metadata.items() if k != "history"}
    metadata["epochs_run"] = len(ckpt.metadata.get("history", []))
    metadata["test_summary"] = results["summary"]
    save_checkpoint(target, ckpt.model, ckpt.config, metadata)
    (BUNDLED_DIR / f"{args.name}.md").write_text(model_card(args.name, ckpt, results, manifest, args.train_command, latency,
                                                                  run_progress(args.last)))
    (BUNDLED_DIR / "ATTRIBUTION.md").write_text(attribution(manifest))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB) and its model card; test summary: "
          + ", ".join(f"{k} {v:.3f}" for k, v in results["summary"].items() if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
