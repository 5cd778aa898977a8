"""The live page in a real browser: Debian's chromium, driven by Playwright, captures a test
scene through its fake microphone (getUserMedia + AudioWorklet at the AudioContext's rate, 44.1
kHz here), streams it through a real ``rtsed.serve``, and the events the page displays equal
those of ``rtsed.detect`` on the audio the page streamed (labels one to one, onsets within
0.1 s). That audio is the scene as chromium delivers it, not the file's samples: chromium starts
the capture a little into the file and resamples it, and the detector's events move with such
changes (sub-hop shifts flip events near a threshold), so the file itself is not the reference.

Screenshots of the page and of the grid page are written under the test's tmp folder; with
RTSED_SCREENSHOT_DIR set, the page's is copied there (the README's picture: RTSED_SCREENSHOT_DIR=docs)."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("starlette", reason="the server needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install -e '.[serve]'")
playwright_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (test extra)")

import soxr  # noqa: E402
from serve_helpers import ServerProcess, detect_events, make_scene  # noqa: E402

CHROMIUM = next((p for p in (os.environ.get("RTSED_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                             shutil.which("chromium-browser")) if p and Path(p).exists()), None)
RATE_HZ = 44100
SCENE_S = 8.0
ONSET_TOLERANCE_S = 0.1


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium to drive: apt-get install chromium (or set RTSED_CHROMIUM)")
def test_the_page_streams_a_scene_and_shows_the_events_of_rtsed_detect(tmp_path):
    # At the rate of the browser's AudioContext (44.1 kHz in headless chromium): the browser
    # passes the samples on unresampled, so the page streams the file's own samples (from
    # wherever capture began), and the server resamples them to the model's 16 kHz.
    scene = tmp_path / "scene44k.wav"
    sf.write(scene, soxr.resample(make_scene(), 16000, RATE_HZ, quality="VHQ"), RATE_HZ, subtype="PCM_16")
    data, _ = sf.read(scene, dtype="float32", always_2d=True)
    server = ServerProcess("--idle-timeout-s", "30", log_path=tmp_path / "server.log")
    try:
        with playwright_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                f"--use-file-for-fake-audio-capture={scene}%noloop", "--autoplay-policy=no-user-gesture-required",
                "--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.url}/?autostart=1&record=1&name=chromium")
            page.wait_for_function("window.rtsed.ready !== null", timeout=30_000)
            # A second page watches the same stream read-only (/?watch=ID, as the grid links it):
            # it shows the same events as the page that streams.
            stream_id = page.evaluate("window.rtsed.ready.stream")
            viewer = browser.new_page(viewport={"width": 1400, "height": 900})
            viewer.on("pageerror", lambda exc: errors.append(str(exc)))
            viewer.goto(f"{server.url}/?watch={stream_id}")
            viewer.wait_for_function("window.rtsed.ready !== null && window.rtsed.ready.watching", timeout=30_000)
            # The whole file and a little silence, in stream time, then the Stop button (the
            # server closes the open events and sends them).
            page.wait_for_function(f"window.rtsed.now >= {SCENE_S + 1.0}", timeout=60_000)
            grid = browser.new_page(viewport={"width": 1400, "height": 500})
            grid.goto(f"{server.url}/grid")
            grid.wait_for_selector("#live tbody tr", timeout=10_000)
            assert "chromium" in grid.inner_text("#live tbody")
            assert grid.get_attribute("#live tbody a.watch", "href") == f"/?watch={stream_id}"
            grid.screenshot(path=str(tmp_path / "serve-grid.png"))
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
            page.click("#stop")
            page.wait_for_function("window.rtsed.closed !== null", timeout=30_000)
            rows = page.eval_on_selector_all(
                "#events tbody tr.event", "rows => rows.map(r => [r.dataset.label, +r.dataset.onset, +r.dataset.offset])")
            viewer.wait_for_function("window.rtsed.closed !== null", timeout=30_000)
            watched = viewer.eval_on_selector_all(
                "#events tbody tr.event", "rows => rows.map(r => [r.dataset.label, +r.dataset.onset, +r.dataset.offset])")
            watch_close = viewer.evaluate("[window.rtsed.closed.code, window.rtsed.closed.reason]")
            start_hidden = viewer.is_hidden("#start")
            rate = page.evaluate("window.rtsed.ready && window.rtsed.closed && window.rtsed.closed.code")
            context_rate = page.evaluate("window.rtsed.contextRate")
            sent = np.frombuffer(base64.b64decode(page.evaluate("window.rtsed.sentBase64()")), "<f4")
            browser.close()
    finally:
        server.stop()
    assert not errors, errors
    assert rate == 1000
    assert sorted(watched) == sorted(rows) and watch_close == [1000, "the stream ended"] and start_hidden
    # What the page streamed is the scene as chromium's fake microphone delivered it: from a
    # little into the file (capture starts when the AudioWorklet first hears the device) and
    # resampled on the way (its samples are not the file's). rtsed.detect runs on exactly that
    # audio, written to a file at the AudioContext's rate.
    assert context_rate in (44100, 48000)
    assert sent.size >= SCENE_S * context_rate and np.abs(sent).max() > 0.1, "the page streamed no scene"
    captured = tmp_path / "captured.wav"
    sf.write(captured, sent, context_rate, subtype="FLOAT")
    expected = [e for e in detect_events(captured) if e[1] < SCENE_S - 0.5]
    assert len(expected) >= 5
    shown = sorted((label, onset, offset) for label, onset, offset in rows if onset < SCENE_S - 0.5)
    assert [e[0] for e in shown] == [e[0] for e in expected], f"page: {shown}\nrtsed.detect: {expected}"
    for got, want in zip(shown, expected):
        assert abs(got[1] - want[1]) <= ONSET_TOLERANCE_S, f"onset {got} vs {want}"
    if os.environ.get("RTSED_SCREENSHOT_DIR"):
        out = Path(os.environ["RTSED_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "serve.png", out / "serve.png")
