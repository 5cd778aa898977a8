"""Event stability: do a detector's events survive a sub-hop shift of the audio, and live capture?

    python -m benchmarks.event_stability --model dnd_7_10 --scenes /work/runs/scenes/test/audio \\
        --negatives ../shared/data/negatives-test --negatives-minutes 5
    python -m benchmarks.event_stability --model dnd_7_10 --scenes DIR --pulse 3   # + PulseAudio capture

A recording does not know where a detector's 20 ms frames fall: a capture that starts 10 ms
later sees the same sound cut into other frames. Each recording is detected as ``rtsed.detect``
detects a file (the same engine, 256-frame steps, the checkpoint's tuned decoder), once whole and
once with its first ``shift`` seconds cut off for every ``--shifts-ms`` (content moved earlier by
the shift, which is added back to the shifted events' times). An event is **unchanged** when the
other run has an event of the same label whose onset lies within ``--onset-tolerance-s`` (0.1 s),
matched one to one; the figure reported is the share of the events of both runs that have such a
partner, 2 m / (n_a + n_b). A shift of a whole hop (20 ms) is the control: it moves every frame
boundary onto another frame boundary, so only the first frames differ.

``--negatives`` adds a few minutes of audio in which no target class sounds (speech, music and
ambience files, taken evenly through the folder's ``meta.csv`` and joined into one stream per
category): the events there are false alarms, and whether they flicker with alignment too.

``--pulse N`` plays the first N scenes, joined with 1 s of silence, through a private PulseAudio
server (tests/pulse.py: null sink -> monitor -> ALSA pulse plugin -> PortAudio) while
``python -m rtsed.live`` records the default input, and compares live's events with ``rtsed.detect``
on the joined file: live's time 0 is when capture saw its first sample, so the offset between the
two timelines is estimated first (the median of same-label onset differences under 1 s) and
removed. This is real time: N minutes of scenes take N minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtsed.audio.files import audio_files_under, read_audio
from rtsed.cli.detect import detect_blocks
from rtsed.serve.decode import SoundEvent

ONSET_TOLERANCE_S = 0.1
READ_BLOCK_S = 10.0  # the engine re-cuts blocks into its steps; any size gives the same events
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stability:
    """Events of two runs over the same audio: n_a, n_b events, ``matched`` pairs (same label,
    onsets within the tolerance, one to one)."""

    n_a: int
    n_b: int
    matched: int

    @property
    def unchanged(self) -> float:
        """Share of both runs' events that have a partner in the other run (1.0 when both are empty)."""
        total = self.n_a + self.n_b
        return 1.0 if total == 0 else 2 * self.matched / total

    def __add__(self, other: "Stability") -> "Stability":
        return Stability(self.n_a + other.n_a, self.n_b + other.n_b, self.matched + other.matched)


def match_events(a: Sequence[SoundEvent], b: Sequence[SoundEvent],
                 tolerance_s: float = ONSET_TOLERANCE_S) -> Stability:
    """Largest one-to-one matching of a's and b's events with the same label and onsets at most
    tolerance_s apart. Per label, onsets sorted: on a line, pairing the earliest unmatched
    candidates first (two pointers) is a maximum matching."""
    matched = 0
    for label in {e.label for e in a} & {e.label for e in b}:
        xs = sorted(e.onset_s for e in a if e.label == label)
        ys = sorted(e.onset_s for e in b if e.label == label)
        i = j = 0
        while i < len(xs) and j < len(ys):
            if abs(xs[i] - ys[j]) <= tolerance_s + 1e-9:
                matched += 1
                i += 1
                j += 1
            elif xs[i] < ys[j]:
                i += 1
            else:
                j += 1
    return Stability(len(a), len(b), matched)


def shifted_events(events: Sequence[SoundEvent], shift_s: float) -> list[SoundEvent]:
    """Events of a recording whose first shift_s seconds were cut off, on the uncut timeline."""
    return [SoundEvent(e.label, e.onset_s + shift_s, e.offset_s + shift_s, e.score) for e in events]


def detect_signal(x: np.ndarray, stepper, config) -> list[SoundEvent]:
    """rtsed.detect's events for mono float32 samples x (N,) at the model's rate."""
    block = int(READ_BLOCK_S * config.frontend.sample_rate_hz)
    events, _ = detect_blocks((x[i:i + block] for i in range(0, len(x), block)), stepper, config)
    return events


def shift_stability(x: np.ndarray, stepper, config, shift_s: float,
                    reference: list[SoundEvent] | None = None) -> Stability:
    """Events of x against those of x without its first shift_s seconds (moved back onto x's
    timeline). reference: x's own events when already known."""
    rate = config.frontend.sample_rate_hz
    if reference is None:
        reference = detect_signal(x, stepper, config)
    cut = int(round(shift_s * rate))
    return match_events(reference, shifted_events(detect_signal(x[cut:], stepper, config), cut / rate))


# ------------------------------------------------------------------------------ recordings


def scene_recordings(folder: Path, rate_hz: int, limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    files = audio_files_under(folder)[:limit]
    return [(f.name, read_audio(f, rate_hz)) for f in files]


def negative_recordings(folder: Path, rate_hz: int, minutes: float) -> list[tuple[str, np.ndarray]]:
    """About ``minutes`` of the folder's audio, a third per category of its meta.csv (speech,
    music, ambience), files taken evenly through the listing, joined with 0.5 s of silence into
    one recording per category."""
    with open(folder / "meta.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    categories = sorted({r["category"] for r in rows})
    budget_s = 60.0 * minutes / len(categories)
    gap = np.zeros(int(0.5 * rate_hz), dtype=np.float32)
    out = []
    for category in categories:
        files = [r for r in rows if r["category"] == category]
        total_s = sum(float(r["duration_s"]) for r in files)
        stride = max(1, int(total_s // budget_s)) if budget_s < total_s else 1
        parts, seconds = [], 0.0
        for r in files[::stride]:
            if seconds >= budget_s:
                break
            x = read_audio(folder / r["filename"], rate_hz)
            parts += [x, gap]
            seconds += len(x) / rate_hz + 0.5
        out.append((f"negatives-test/{category}", np.concatenate(parts)))
    return out


# ------------------------------------------------------------------------------ live capture


def _pulse_module():
    """tests/pulse.py, the private PulseAudio server the live tests use (tests/ is no package)."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import pulse
    finally:
        sys.path.pop(0)
    return pulse


def estimate_offset(live: Sequence[SoundEvent], offline: Sequence[SoundEvent], within_s: float = 1.0) -> float:
    """Live's timeline minus the file's: the median of same-label onset differences under within_s."""
    diffs = [e.onset_s - r.onset_s for e in live for r in offline
             if e.label == r.label and abs(e.onset_s - r.onset_s) < within_s]
    return float(np.median(diffs)) if diffs else 0.0


def live_through_pulse(model: str, wav: Path, workdir: Path) -> tuple[list[SoundEvent], str]:
    """rtsed.live's events while wav plays through a private PulseAudio server -> (events, live's stderr)."""
    import soundfile as sf

    pulse = _pulse_module()
    seconds = sf.info(str(wav)).duration
    jsonl = workdir / "live.jsonl"
    with pulse.pulse_server(workdir / "pulse") as server:
        # The server's environment moves HOME into its folder: keep this user's native kernel build.
        native = os.environ.get("RTSED_NATIVE_CACHE", str(Path.home() / ".cache" / "rtsed" / "native"))
        env = dict(server.env, PYTHONPATH=str(REPO), RTSED_NATIVE_CACHE=native)
        proc = subprocess.Popen([sys.executable, "-m", "rtsed.live", "--model", model, "--no-view",
                                 "--jsonl", str(jsonl), "--duration", str(seconds + 4.0)],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 300
            while not server.pactl("list", "short", "source-outputs").strip():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"rtsed.live did not open the input: {proc.communicate()[1]}")
                time.sleep(0.05)
            player = server.play(wav)
            player.communicate(timeout=seconds + 60)
            _, err = proc.communicate(timeout=seconds + 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    events = []
    for line in jsonl.read_text().splitlines():
        item = json.loads(line)
        if item.get("type") == "event":
            events.append(SoundEvent(item["label"], item["onset_s"], item["offset_s"], item["score"]))
    return events, err


# ------------------------------------------------------------------------------ report


def main(argv: list[str] | None = None) -> int:
    from rtsed.models.bundled import resolve_model
    from rtsed.serve.engine import make_stepper

    p = argparse.ArgumentParser(prog="python -m benchmarks.event_stability", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="checkpoint or bundled name (repeatable)")
    p.add_argument("--scenes", type=Path, help="a folder of scenes (e.g. the fold-4 test scenes' audio/)")
    p.add_argument("--scene-limit", type=int, help="only the first N scenes")
    p.add_argument("--negatives", type=Path, help="a folder with meta.csv of audio without target classes")
    p.add_argument("--negatives-minutes", type=float, default=5.0)
    p.add_argument("--shifts-ms", type=float, nargs="*", default=[5.0, 10.0, 15.0, 20.0],
                   help="shifts to measure (none: only --pulse)")
    p.add_argument("--onset-tolerance-s", type=float, default=ONSET_TOLERANCE_S)
    p.add_argument("--pulse", type=int, default=0, metavar="N", help="also play the first N scenes through PulseAudio")
    p.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = p.parse_args(argv)
    if not args.scenes and not args.negatives:
        p.error("give --scenes and/or --negatives")

    report: dict = {}
    for spec in args.model:
        path = resolve_model(spec)
        stepper, config, _ = make_stepper(path, "torch", "cpu")
        rate = config.frontend.sample_rate_hz
        sets = []
        if args.scenes and args.shifts_ms:
            sets.append(("scenes", scene_recordings(args.scenes, rate, args.scene_limit)))
        if args.negatives and args.shifts_ms:
            sets.append(("negatives", negative_recordings(args.negatives, rate, args.negatives_minutes)))
        model_report: dict = {}
        for set_name, recordings in sets:
            minutes = sum(len(x) for _, x in recordings) / rate / 60
            totals = {s: Stability(0, 0, 0) for s in args.shifts_ms}
            for _, x in recordings:
                reference = detect_signal(x, stepper, config)
                for s in args.shifts_ms:
                    totals[s] += shift_stability(x, stepper, config, s / 1000, reference)
            model_report[set_name] = {"minutes": round(minutes, 2), "shifts": {
                f"{s:g}ms": {"events": t.n_a, "events_shifted": t.n_b, "matched": t.matched,
                             "unchanged": round(t.unchanged, 4)} for s, t in totals.items()}}
            for s, t in totals.items():
                print(f"{path.stem:18s} {set_name:9s} {minutes:5.1f} min  shift {s:4g} ms: {t.n_a:4d} / {t.n_b:4d} "
                      f"events, {t.matched:4d} matched, {100 * t.unchanged:5.1f} % unchanged", flush=True)
        if args.pulse:
            import soundfile as sf

            if not args.scenes:
                p.error("--pulse plays scenes: give --scenes")
            scenes = scene_recordings(args.scenes, rate, args.pulse)
            gap = np.zeros(rate, dtype=np.float32)
            joined = np.concatenate([part for _, x in scenes for part in (x, gap)])
            with tempfile.TemporaryDirectory() as tmp:
                wav = Path(tmp) / "scenes.wav"
                sf.write(str(wav), joined, rate, subtype="PCM_16")
                offline, _ = detect_blocks([read_audio(wav, rate)], stepper, config)
                live, err = live_through_pulse(str(path), wav, Path(tmp))
            offset = estimate_offset(live, offline)
            t = match_events(offline, shifted_events(live, -offset), args.onset_tolerance_s)
            summary = err.strip().splitlines()[-1] if err.strip() else ""
            model_report["pulse"] = {"minutes": round(len(joined) / rate / 60, 2), "offset_s": round(offset, 3),
                                     "events_detect": t.n_a, "events_live": t.n_b, "matched": t.matched,
                                     "unchanged": round(t.unchanged, 4), "live_summary": summary}
            print(f"{path.stem:18s} pulse     {len(joined) / rate / 60:5.1f} min  live vs detect (offset "
                  f"{offset:+.3f} s): {t.n_a:4d} / {t.n_b:4d} events, {t.matched:4d} matched, "
                  f"{100 * t.unchanged:5.1f} % unchanged; live: {summary}", flush=True)
        report[path.stem] = model_report
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
