"""The terminal view of ``python -m rtsed.live`` (``live.render_view``), rendered with rich for
real, and when ``run()`` draws it.

The view's numbers come from a real ``DetectionEngine`` (front end, decoder, latency, compute
stats), a real ``ArraySource`` (level, sanitiser counters, resampler delay) and ``EventSinks``.
Only the network is a stand-in (``BandModel``): class c's probability is read off the log-mel band
that peaks at its frequency, so the test knows from the audio which class is high and which low,
where the events are, and which one is still open. The ``run()`` tests use a real checkpoint
(tests/test_engine.py's randomised dnd_3_10) through ``live.main``.

The scene (48 kHz in, resampled to 16 kHz, so the resampler delay enters the latency):

    0.0-0.6 s   digital silence, with NaN samples (replaced by zeros and counted)
    0.6-1.6 s   "beep": 1 kHz tone, amplitude 0.5, three samples at full scale (counted clipped)
    1.6-2.2 s   digital silence
    2.2-3.2 s   "whistle": 3 kHz tone, amplitude 0.5, under a faint beep (1 kHz, amplitude 0.05)

Rendered at 0.5 s (nothing yet) and at 3.0 s (the beep finished, the whistle open, its bar long
and the faint beep's short). Log-mel of the band at a tone's frequency (natural log of power,
measured): amplitude 0.5 -> ~4.3 (1 kHz) / ~3.7 (3 kHz), 0.05 -> ~-0.3, silence -> -23; with a
bias of 1 the probabilities are ~0.97, ~0.94, ~0.22 and ~0.
"""

from __future__ import annotations

import io
import json
import math
import re
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from rich.console import Console

from rtsed.cli import live
from rtsed.config import DecoderConfig, DetectorConfig, FrontendConfig, ModelConfig
from rtsed.serve.decode import OnsetNotice, SoundEvent
from rtsed.serve.engine import DetectionEngine
from rtsed.audio.frontend import mel_filterbank
from rtsed.audio.sources import ArraySource
from engine_helpers import scene  # tests/ is on sys.path

RATE = 16000  # the model's
IN_RATE = 48000  # the source's
LABELS = ("beep", "whistle")
BAND_HZ = (1000.0, 3000.0)
BIAS = 1.0
LOOKAHEAD = 2
FRAMES_PER_STEP = 4
BAR = 30  # characters of a full activity bar (live.render_view)
WIDTH = 300  # console columns: the status line fits on one line
NAN_SAMPLES = 7
CLIPPED_SAMPLES = 3


class BandModel:
    """A stand-in model behind the stepper interface (rtsed.serve.engine): class c's probability at
    frame t is sigmoid(logmel[t, band_c] - BIAS), band_c the mel band whose filter peaks at
    BAND_HZ[c]; output frame t comes out once frame t + LOOKAHEAD is in, as from a model with
    that lookahead, and frames from ``end()`` on are padding (never valid)."""

    def __init__(self, config: DetectorConfig, lookahead_frames: int = LOOKAHEAD):
        fe = config.frontend
        bins_hz = np.fft.rfftfreq(fe.fft_size, 1 / fe.sample_rate_hz)
        filters = mel_filterbank(fe)
        self.bands = [int(np.argmax(filters[:, np.argmin(np.abs(bins_hz - hz))])) for hz in BAND_HZ]
        self.lookahead_frames = lookahead_frames
        self.batch_size = 1
        self.reset()

    def reset(self, streams=None) -> None:
        self.probs = np.zeros((0, len(self.bands)), np.float32)  # (T, C) of every frame in
        self.ended_at: int | None = None

    def end(self, streams=None) -> None:
        self.ended_at = self.probs.shape[0]

    def pending_after_end(self, stream: int = 0) -> int:
        return max(0, self.ended_at + self.lookahead_frames - self.probs.shape[0])

    def step(self, logmel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """logmel: (1, n, F) raw -> probs (1, n, C), frame index (1, n), valid (1, n)."""
        n = logmel.shape[1]
        start = self.probs.shape[0]
        p = 1.0 / (1.0 + np.exp(-(logmel[0][:, self.bands].astype(np.float64) - BIAS)))
        self.probs = np.concatenate([self.probs, p.astype(np.float32)])
        t = start + np.arange(n) - self.lookahead_frames
        end = self.probs.shape[0] if self.ended_at is None else self.ended_at
        valid = (t >= 0) & (t < end)
        out = np.where(valid[:, None], self.probs[np.clip(t, 0, None)], 0.0).astype(np.float32)
        return out[None], t[None], valid[None]


class CountingSource(ArraySource):
    """An ArraySource whose producer-side counters (a microphone ring's drops, PortAudio's
    overflows) are set by the test: an array has no ring to overflow."""

    dropped_blocks = 0
    overflows = 0

    def _ring_counters(self) -> tuple[int, int, int]:
        return self.dropped_blocks, self.dropped_blocks * self.block_frames, self.overflows


def make_engine(decoder_overrides=None, extra_latency_s: float = 0.0) -> DetectionEngine:
    """beep and whistle on BandModel; hysteresis 0.5 / 0.3, min_event_s and min_gap_s 0.1."""
    config = DetectorConfig(
        frontend=FrontendConfig.for_rate(RATE),
        model=ModelConfig.from_name("dnd_3_1_causal", n_classes=len(LABELS), channels=8),  # name and n_mels only
        labels=LABELS,
        decoder=DecoderConfig(on_thresholds=(0.5, 0.5), off_thresholds=(0.3, 0.3), min_event_s=0.1, min_gap_s=0.1),
    )
    return DetectionEngine(BandModel(config), config, frames_per_step=FRAMES_PER_STEP,
                           decoder_overrides=decoder_overrides, extra_latency_s=extra_latency_s)


def tone(hz: float, amplitude: float, seconds: float, rate_hz: int = IN_RATE) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate_hz)) / rate_hz)


def view_scene() -> np.ndarray:
    """The scene of the module docstring: float32 (3.2 s * IN_RATE,)."""
    x = np.concatenate([np.zeros(int(0.6 * IN_RATE)), tone(1000, 0.5, 1.0), np.zeros(int(0.6 * IN_RATE)),
                        tone(3000, 0.5, 1.0) + tone(1000, 0.05, 1.0)]).astype(np.float32)
    x[int(0.1 * IN_RATE):int(0.1 * IN_RATE) + NAN_SAMPLES] = np.nan
    x[int(1.0 * IN_RATE) + np.arange(CLIPPED_SAMPLES) * 100] = 1.0
    return x


class Stream:
    """Source -> engine -> sinks, block by block, as live.run() does; events kept in order."""

    def __init__(self, x: np.ndarray, decoder_overrides=None, rate_hz: int = IN_RATE):
        self.x = x
        self.source = CountingSource(x, rate_hz, RATE, block_s=0.02, name="test input")
        self.engine = make_engine(decoder_overrides, extra_latency_s=self.source.delay_s)  # as live.run()
        self.sinks = live.EventSinks(None, None, None, "scene")
        self.items: list[OnsetNotice | SoundEvent] = []
        self.read_frames = 0  # samples at the source's rate handed on so far
        self.last_block = np.zeros(0, np.float32)  # the last raw block (before resampling)
        self.source.start()

    def run_until(self, seconds: float) -> None:
        while self.read_frames < round(seconds * self.source.stats.device_rate_hz):
            block = self.source.read()
            assert block is not None, "the scene ended early"
            n = self.source.block_frames
            self.last_block = np.nan_to_num(self.x[self.read_frames:self.read_frames + n])
            self.read_frames += n
            for item in self.engine.push_audio(block):
                self.items.append(item)
                self.sinks.emit(item)

    def events(self) -> list[SoundEvent]:
        return [e for e in self.items if isinstance(e, SoundEvent)]

    def open_labels(self) -> set[str]:
        """Classes with an onset notice and no event yet."""
        noticed = [n.label for n in self.items if isinstance(n, OnsetNotice)]
        ended = [e.label for e in self.events()]
        return {label for label in noticed if noticed.count(label) > ended.count(label)}


def render(stream: Stream, elapsed_s: float = 12.34) -> tuple[str, list[list]]:
    """(plain text, segments per line) of the view, rendered by rich at WIDTH columns."""
    console = Console(record=True, width=WIDTH, file=io.StringIO(), color_system="truecolor")
    view = live.render_view(stream.engine, stream.source, stream.sinks, elapsed_s)
    lines = console.render_lines(view, console.options, pad=False)
    console.print(view)
    return console.export_text(), lines


def bar_rows(text: str, lines: list[list]) -> dict[str, tuple[int, float, object]]:
    """{label: (filled bar characters, printed probability, the bar's rich Style)}."""
    rows = {}
    for segments in lines:
        line = "".join(s.text for s in segments)
        for label in LABELS:
            m = re.search(rf"\s{label} (█*·*) (\d\.\d\d)", line)
            if m:
                assert len(m.group(1)) == BAR, line  # filled cells, then empty ones, 30 in all
                (bar,) = [s for s in segments if s.text == m.group(1)]
                rows[label] = (m.group(1).count("█"), float(m.group(2)), bar.style)
    assert set(rows) == set(LABELS), text
    return rows


def status_value(text: str, pattern: str) -> str:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in the view:\n{text}"
    return m.group(1)


def is_highlighted(style) -> bool:
    return bool(style.bold) and style.color is not None and style.color.name == "green"


# ------------------------------------------------------------------------------------ render_view


def test_view_shows_bars_events_level_latency_and_counters():
    stream = Stream(view_scene())
    fe = stream.engine.config.frontend

    # 0.5 s: silence (NaNs zeroed), nothing detected yet.
    stream.run_until(0.5)
    text, lines = render(stream)
    assert "rtsed live: dnd_3_1_causal" in text  # the panel title: the model
    assert status_value(text, r"\bt\s+(\S+) s ") == "12.3"
    rows = bar_rows(text, lines)
    assert all(n == 0 and p == 0.0 and not is_highlighted(style) for n, p, style in rows.values()), rows
    assert "(no events yet)" in text
    assert status_value(text, r"input\s+(\S+) dBFS \(test input\)") == "-120.0"  # the level floor
    assert status_value(text, r"non-finite fixed (\d+)") == str(NAN_SAMPLES)
    assert status_value(text, r"dropped blocks (\d+)") == "0" and status_value(text, r"overflows (\d+)") == "0"

    # Latency: window + (lookahead + frames_per_step - 1) hops + the 48 -> 16 kHz resampler's delay.
    assert stream.source.delay_s > 0
    latency_ms = 1000 * (fe.window_s + (LOOKAHEAD + FRAMES_PER_STEP - 1) * fe.hop_s + stream.source.delay_s)
    assert status_value(text, r"latency (\d+) ms") == f"{latency_ms:.0f}"
    compute = float(status_value(text, r"compute (\d+\.\d\d) ms/hop"))
    assert compute == pytest.approx(stream.engine.stats.compute_ms_per_hop(), abs=0.005) and compute > 0
    rtf = float(status_value(text, r"\(RTF (\d+\.\d{3})\)"))
    assert rtf == pytest.approx(stream.engine.stats.compute_ms_per_hop() / (1000 * fe.hop_s), abs=5e-4)

    # 3.0 s: the beep has finished, the whistle is open, the faint beep under it stays low.
    stream.source.dropped_blocks, stream.source.overflows = 3, 2  # the source reports drops
    stream.run_until(3.0)
    (beep,) = stream.events()
    assert beep.label == "beep" and abs(beep.onset_s - 0.6) <= 0.04 and abs(beep.offset_s - 1.6) <= 0.04, beep
    assert stream.open_labels() == {"whistle"}
    p = dict(zip(LABELS, map(float, stream.engine.latest_probs)))
    assert p["whistle"] > 0.9 and 0.1 < p["beep"] < 0.4, p  # the scene's design (module docstring)

    text, lines = render(stream)
    rows = bar_rows(text, lines)
    for label in LABELS:  # each bar: round(30 p) cells, and p printed beside it
        n, printed, _ = rows[label]
        assert n == round(BAR * p[label]) and printed == pytest.approx(p[label], abs=0.005), (label, rows, p)
    assert rows["whistle"][0] > rows["beep"][0] + 10  # higher probability, longer bar
    assert is_highlighted(rows["whistle"][2]) and not is_highlighted(rows["beep"][2])  # p >= on: green

    # The finished event with its onset, offset and score; the open whistle is not listed yet.
    assert "(no events yet)" not in text
    m = re.search(r"(\d+\.\d\d)-\s*(\d+\.\d\d) s  (\w+)  \((\d\.\d\d)\)", text)
    assert m and m.group(3) == "beep", text
    assert (float(m.group(1)), float(m.group(2)), float(m.group(4))) == pytest.approx(
        (beep.onset_s, beep.offset_s, beep.score), abs=0.005)
    assert "whistle  (" not in text

    # Input level: the last block's RMS (whistle + faint beep: ~-9.0 dBFS), not the silence of 0.5 s.
    rms = math.sqrt(float(np.mean(stream.last_block.astype(np.float64) ** 2)))
    assert status_value(text, r"input\s+(\S+) dBFS") == f"{20 * math.log10(rms):.1f}" == "-9.0"
    # The source's counters as it reports them.
    assert status_value(text, r"dropped blocks (\d+)") == "3" and status_value(text, r"overflows (\d+)") == "2"
    assert status_value(text, r"non-finite fixed (\d+)") == str(NAN_SAMPLES)
    assert status_value(text, r"clipped (\d+)") == str(CLIPPED_SAMPLES)
    assert "silent" not in text


def test_view_highlights_with_the_thresholds_in_force():
    """--threshold whistle=0.97:0.3: at p ~0.94 the decoder opens no whistle event, and the view
    must not show the whistle as active either (it uses the decoder's thresholds, overrides
    included, not the checkpoint's)."""
    stream = Stream(view_scene(), decoder_overrides={"whistle": (0.97, 0.3)})
    stream.run_until(3.0)
    assert stream.open_labels() == set() and 0.9 < stream.engine.latest_probs[1] < 0.97
    rows = bar_rows(*render(stream))
    assert rows["whistle"][0] >= 27 and not is_highlighted(rows["whistle"][2]), rows


def test_view_warns_about_a_silent_input_and_stops_when_sound_returns():
    """More than 10 s below -80 dBFS: the view asks whether the microphone is muted; one loud
    block clears the warning."""
    x = np.concatenate([np.zeros(11 * RATE), tone(1000, 0.5, 0.1, RATE)]).astype(np.float32)
    stream = Stream(x, rate_hz=RATE)
    stream.run_until(9.9)
    text, _ = render(stream)
    assert "silent" not in text
    stream.run_until(11.0)
    text, _ = render(stream)
    assert status_value(text, r"input silent for (\d+) s: is the microphone muted\?") == "11"
    stream.run_until(11.02)
    text, _ = render(stream)
    assert "silent" not in text and status_value(text, r"input\s+(\S+) dBFS") == "-9.0"


# ------------------------------------------------------------------------------- run() and a TTY


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal (rich then draws the live view into it)."""

    def isatty(self) -> bool:
        return True


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


@pytest.mark.parametrize("tty, no_view", [(False, False), (True, False), (True, True)])
def test_run_draws_the_view_only_on_a_terminal_and_jsonl_flows_either_way(checkpoint, tty, no_view, tmp_path,
                                                                           capsys, monkeypatch):
    """live.main on a file with --jsonl -: on a terminal stderr the view is drawn and its final
    frame lists every event; with stderr not a terminal, or with --no-view, nothing of it is
    written; stdout carries the same pure JSON lines in all three cases."""
    audio = tmp_path / "scene.wav"
    sf.write(audio, scene(), RATE, subtype="FLOAT")
    for name in ("TTY_COMPATIBLE", "FORCE_COLOR", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    stderr = FakeTerminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    argv = ["--model", str(checkpoint), "--input", str(audio), "--jsonl", "-"] + (["--no-view"] if no_view else [])
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        assert live.main(argv) == 0, stderr.getvalue()
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    err = stderr.getvalue()

    lines = [json.loads(line) for line in out.splitlines()]  # raises on any non-JSON line
    events = [x for x in lines if x["type"] == "event"]
    assert lines[0]["type"] == "session", lines[0]
    assert events and len(lines) == 1 + 2 * len(events), lines  # the session line, then an onset and an event line each
    assert "rtsed live: dnd_3_10 (" in err and f"{len(events)} events; compute" in err  # banner, summary

    if tty and not no_view:
        final = ANSI.sub("", err).rsplit("rtsed live: dnd_3_10 ─", 1)  # the last frame drawn
        assert len(final) == 2 and "\x1b[" in err, err  # drawn with escape codes
        frame = final[1]
        for e in events:
            assert f"{e['onset_s']:8.2f}-{e['offset_s']:8.2f} s  {e['label']}  ({e['score']:.2f})" in frame, frame
        for label in ("tone", "noise", "click"):
            assert re.search(rf"\s{label} [█·]{{{BAR}}} \d\.\d\d", frame), frame
        assert "dropped blocks 0  overflows 0" in frame and "dBFS (scene.wav)" in frame
    else:
        assert "█" not in err and "·" not in err and "╭" not in err and "\x1b[" not in err, err
