"""train.evaluate on a tiny procedurally made DCASE data set: an oracle model (logits +/-10 from the
true frame targets) must score perfectly, an oracle that never outputs one class must score exactly
what hand counting predicts, a model whose frames are written down literally scores the counts
worked out by hand (no rasteriser involved), and the CLI writes JSON with parameters and fails cleanly (exit 2) on
bad input. No shared data set is needed."""

from __future__ import annotations

import json
from pathlib import Path
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from rtsed.models.checkpoint import save_checkpoint
from rtsed.config import DecoderConfig, DetectorConfig, FrontendConfig, ModelConfig
from rtsed.models.model import SEDModel
from train.annotations import Event, events_to_frame_targets, write_dcase_tsv
from train.datasets import DcaseDataset

pytest.importorskip("sed_eval")
pytest.importorskip("sed_scores_eval")

from train import evaluate as ev  # noqa: E402  (after the skips: it needs the metric libraries)

RATE = 16000
LABELS = ("noise", "tone")  # checkpoint output order
FRONTEND = FrontendConfig.for_rate(RATE)
HOP_S = FRONTEND.hop_s
# Three files of distinct lengths (the oracle recognises a file by its frame count). Onsets are
# off the 20 ms grid on purpose; same-class events are >= 0.5 s apart; tone and noise overlap.
SCENES = {
    "a.wav": (8.0, [(0.513, 2.0, "tone"), (2.9, 4.25, "noise"), (5.0, 6.1, "tone"), (5.6, 7.3, "noise")]),
    "b.wav": (9.0, [(1.0, 1.8, "noise"), (2.2, 3.333, "tone"), (4.0, 8.99, "tone")]),
    "c.wav": (10.0, [(0.25, 1.25, "tone"), (3.01, 4.5, "noise"), (6.0, 9.4, "noise"), (8.0, 8.6, "tone")]),
}


def _scene(duration_s: float, events, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(duration_s * RATE)
    x = 0.003 * rng.standard_normal(n)  # quiet background: not digital silence
    t = np.arange(n) / RATE
    for on, off, label in events:
        a, b = int(on * RATE), min(int(off * RATE), n)
        burst = np.sin(2 * np.pi * 1000 * t[a:b]) if label == "tone" else rng.standard_normal(b - a)
        x[a:b] += 0.3 * burst
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcase")
    audio = root / "audio"
    audio.mkdir()
    events = []
    for k, (name, (duration, evs)) in enumerate(SCENES.items()):
        sf.write(audio / name, _scene(duration, evs, k), RATE, subtype="PCM_16")
        events += [Event(name, on, off, lab) for on, off, lab in evs]
    write_dcase_tsv(root / "test.tsv", events)
    return root


def _make_checkpoint(path, decoder=DecoderConfig()):
    torch.manual_seed(0)
    model_cfg = ModelConfig.from_name("dnd_3_1_causal", n_classes=len(LABELS), channels=8)
    config = DetectorConfig(frontend=FRONTEND, model=model_cfg, labels=LABELS, decoder=decoder)
    return save_checkpoint(path, SEDModel(model_cfg).eval(), config, metadata={"epoch": 3})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _true_targets() -> dict[int, np.ndarray]:
    """{n_frames: (T, C) targets} of each scene (frame counts differ between files)."""
    out = {}
    for name, (duration, evs) in SCENES.items():
        n_frames = FRONTEND.n_frames(int(duration * RATE))
        targets = events_to_frame_targets([Event(name, *e) for e in evs], n_frames, HOP_S, LABELS)
        out[n_frames] = targets
    assert len(out) == len(SCENES)
    return out


@pytest.fixture
def oracle(monkeypatch):
    """Replace every SEDModel's forward by logits +10 on the true targets, -10 elsewhere, with the
    classes in ``dropped`` forced to -10. The features still flow: the file is found by its frame
    count, and the input must have the front end's shape."""
    table = _true_targets()
    dropped: set[str] = set()

    def forward(self, x):
        assert x.dim() == 3 and x.shape[0] == 1 and x.shape[2] == FRONTEND.n_mels
        y = torch.from_numpy(table[x.shape[1]]).clone()
        for label in dropped:
            y[:, LABELS.index(label)] = 0
        return (y * 20 - 10).to(x)[None]

    monkeypatch.setattr(SEDModel, "forward", forward)
    return dropped


def _items(dataset_dir):
    return DcaseDataset(dataset_dir / "audio", dataset_dir / "test.tsv", LABELS, split="test").split("test")


def test_oracle_scores_perfectly(dataset_dir, checkpoint, oracle, tmp_path):
    res = ev.evaluate(checkpoint, _items(dataset_dir), cache_dir=tmp_path / "cache", data="toy", split="test")
    # no decoder thresholds in this checkpoint: 0.5, then the live decoder (0.5 on/off too)
    point, decoded = res["operating_points"]
    assert point["threshold"] == 0.5 and decoded["threshold"] == "decoder"
    for key in ("frame", "segment", "event"):  # the oracle's +/-10 logits: the decoder loses nothing
        assert decoded[key]["f1"] == pytest.approx(1.0), key
    fr = point["frame"]
    assert fr["f1"] == 1.0 and fr["error_rate"] == 0.0 and fr["fp"] == 0 and fr["fn"] == 0
    assert fr["n_frames"] == sum(t.shape[0] for t in _true_targets().values())
    assert point["segment"]["f1"] == pytest.approx(1.0) and point["segment"]["error_rate"] == pytest.approx(0.0)
    assert point["event"]["f1"] == pytest.approx(1.0) and point["event"]["error_rate"] == pytest.approx(0.0)
    n_events = sum(len(e) for _, e in SCENES.values())
    assert point["n_estimated_events"] == n_events == res["data"]["n_events"]
    assert res["psds1"]["error"] is None and res["psds1"]["psds"] > 0.99
    for label in LABELS:
        c = point["per_class"][label]
        assert c["frame"]["f1"] == 1.0 and c["segment"]["f1"] == pytest.approx(1.0)
        assert c["event"]["f1"] == pytest.approx(1.0) and c["psds1"] > 0.99
    assert res["summary"]["frame_f1"] == 1.0 and res["summary"]["psds1"] > 0.99
    assert res["data"]["n_files"] == 3 and res["data"]["duration_s"] == pytest.approx(27.0)
    # Every score carries its parameters.
    assert point["segment"]["params"]["segment_s"] == 1.0
    # Event F1 as DCASE scores it (onset 200 ms, offset max(200 ms, 20 %)); onset-only beside it.
    assert point["event"]["params"]["collar_s"] == 0.2 and point["event"]["params"]["evaluate_offset"] is True
    assert point["event"]["params"]["offset_fraction"] == 0.2
    assert point["event_onset"]["params"]["evaluate_offset"] is False and point["event_onset"]["f1"] == 1.0
    assert "plain threshold" in point["event"]["params"]["decode"]
    assert res["psds1"]["params"]["dtc_threshold"] == 0.7 and res["psds1"]["params"]["alpha_st"] == 1.0
    # Features went through the training feature cache (one .npy per file), keyed by front end.
    from train.features import config_digest

    assert len(list((tmp_path / "cache" / config_digest(FRONTEND)).glob("*.npy"))) == 3
    json.dumps(res, allow_nan=False)  # plain, strict JSON


def _segment_cells(events, seg=1.0):
    return {(f, lab, k) for f, on, off, lab in events
            for k in range(math.floor(on / seg), math.ceil(off / seg))}


def test_oracle_without_one_class_scores_as_counted(dataset_dir, checkpoint, oracle):
    oracle.add("noise")
    res = ev.evaluate(checkpoint, [(i.audio_path, i.events) for i in _items(dataset_dir)])  # plain pairs
    point = res["operating_points"][0]

    # Frames: every noise cell is a deletion, nothing is inserted.
    targets = np.concatenate(list(_true_targets().values()))
    n_tone, n_noise = targets[:, LABELS.index("tone")].sum(), targets[:, LABELS.index("noise")].sum()
    fr = point["frame"]
    assert (fr["tp"], fr["fp"], fr["fn"]) == (n_tone, 0, n_noise)
    assert fr["recall"] == pytest.approx(n_tone / (n_tone + n_noise))
    assert fr["f1"] == pytest.approx(2 * n_tone / (2 * n_tone + n_noise))
    assert fr["error_rate"] == pytest.approx(n_noise / (n_tone + n_noise))
    assert fr["deletions"] == n_noise and fr["substitutions"] == fr["insertions"] == 0

    # Segments of 1 s: the tone's (segment, class) cells are found, the noise's are missed.
    events = [(f, on, off, lab) for f, (_, evs) in SCENES.items() for on, off, lab in evs]
    tone_cells = _segment_cells([e for e in events if e[3] == "tone"])
    noise_cells = _segment_cells([e for e in events if e[3] == "noise"])
    seg = point["segment"]
    assert seg["precision"] == pytest.approx(1.0)
    assert seg["recall"] == pytest.approx(len(tone_cells) / (len(tone_cells) + len(noise_cells)))
    assert seg["error_rate"] == pytest.approx(len(noise_cells) / (len(tone_cells) + len(noise_cells)))

    # Events: all tone events found (onsets within 20 ms), no noise event.
    r = sum(e[3] == "tone" for e in events) / len(events)
    assert point["event"]["recall"] == pytest.approx(r)
    assert point["event"]["f1"] == pytest.approx(2 * r / (1 + r))
    assert point["per_class"]["noise"]["event"]["f1"] == 0.0
    assert point["per_class"]["tone"]["event"]["f1"] == pytest.approx(1.0)

    # PSDS1: tone ~1, noise 0; alpha_st = 1 subtracts the std of the two: mean - std = 0.
    ps = res["psds1"]
    assert ps["per_class"]["tone"] > 0.99 and ps["per_class"]["noise"] == pytest.approx(0.0)
    assert ps["psds"] == pytest.approx(0.0, abs=0.01)


def test_scores_match_counts_made_by_hand(tmp_path, checkpoint, monkeypatch):
    """An oracle independent of evaluate's rasteriser: the model's frames are written down literally
    and every expected count below is worked out by hand from the frame-time rule (docs: frame t's
    label cell is [t * 20 ms, (t + 1) * 20 ms); an event activates every cell it overlaps).

    One 2 s file: 99 frames (1 + (32000 - 640) // 320).
      reference  tone  [0.513, 0.995) -> cells 25..49 (0.50 <= 0.513 < 0.52; 0.98 < 0.995 <= 1.00): 25
                 noise [1.21, 1.47)   -> cells 60..73 (1.20 <= 1.21; 1.46 < 1.47 <= 1.48): 14
      model      tone  frames 20..44, noise frames 60..73 and 80..84 (a false alarm)
      frames     tone: 25..44 hit (20), 20..24 false (5), 45..49 missed (5); noise: 14 hit, 5 false
                 tp 34, fp 10, fn 5: F1 = 68 / 83, precision 34 / 44, recall 34 / 39
      events     tone [0.40, 0.90) vs [0.513, 0.995): onset 0.113 s, offset 0.095 s off, inside the
                 200 ms collars; noise [1.20, 1.48) matches; [1.60, 1.70) is an insertion:
                 tp 2, fp 1, fn 0: F1 = 4 / 5
    """
    audio = tmp_path / "audio"
    audio.mkdir()
    reference = [(0.513, 0.995, "tone"), (1.21, 1.47, "noise")]
    sf.write(audio / "d.wav", _scene(2.0, reference, 7), RATE, subtype="PCM_16")
    write_dcase_tsv(tmp_path / "d.tsv", [Event("d.wav", *e) for e in reference])
    active = {"tone": [range(20, 45)], "noise": [range(60, 74), range(80, 85)]}

    def forward(self, x):
        assert x.shape == (1, 99, FRONTEND.n_mels)
        logits = torch.full((1, 99, len(LABELS)), -10.0)
        for label, spans in active.items():
            for frames in spans:
                logits[0, frames.start:frames.stop, LABELS.index(label)] = 10.0
        return logits

    monkeypatch.setattr(SEDModel, "forward", forward)
    items = DcaseDataset(audio, tmp_path / "d.tsv", LABELS, split="test").split("test")
    point = ev.evaluate(checkpoint, items)["operating_points"][0]
    fr = point["frame"]
    assert (fr["tp"], fr["fp"], fr["fn"]) == (34, 10, 5)
    assert fr["f1"] == pytest.approx(68 / 83) and fr["precision"] == pytest.approx(34 / 44)
    assert fr["recall"] == pytest.approx(34 / 39)
    assert point["per_class"]["noise"]["frame"]["f1"] == pytest.approx(28 / 33)  # 2 * 14 / (28 + 5)
    assert point["per_class"]["tone"]["frame"]["f1"] == pytest.approx(40 / 50)  # 2 * 20 / (40 + 10)
    assert point["event"]["f1"] == pytest.approx(4 / 5)
    assert point["n_estimated_events"] == 3


def test_decoder_thresholds_are_a_second_operating_point(dataset_dir, tmp_path, oracle):
    path = _make_checkpoint(tmp_path / "dec.pt", DecoderConfig(on_thresholds=(0.7, 0.3)))
    res = ev.evaluate(path, _items(dataset_dir))
    names = [p["name"] for p in res["operating_points"]]
    assert names == ["threshold 0.5", "decoder on_thresholds", "live decoder"]
    assert res["operating_points"][1]["threshold"] == [0.7, 0.3]
    assert res["operating_points"][1]["frame"]["f1"] == 1.0  # +/-10 logits pass any threshold
    assert "on_thresholds, per class [0.7, 0.3]" in ev.format_report(res)


def test_unknown_reference_label_names_file_and_label(dataset_dir, checkpoint):
    items = _items(dataset_dir)
    bad = [(items[0].audio_path, items[0].events + (Event("a.wav", 1.0, 2.0, "dog"),))]
    with pytest.raises(ev.EvaluationError, match=r"a\.wav.*'dog'"):
        ev.evaluate(checkpoint, bad)


def test_cli_writes_report_and_json(dataset_dir, checkpoint, tmp_path, capsys):
    out = tmp_path / "out" / "scores.json"
    code = ev.main(["--model", str(checkpoint), "--test-data", str(dataset_dir / "audio"),
                    str(dataset_dir / "test.tsv"), "--json", str(out), "--device", "cpu",
                    "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    text = capsys.readouterr().out
    for needle in ("dnd_3_1_causal", str(checkpoint), "3 files", "frame-wise (paper)", "1 s segments",
                   "collar 0.2 s, onset only", "PSDS1", "dtc 0.7", "Per class", "tone", "noise"):
        assert needle in text, needle
    res = json.loads(out.read_text())
    assert res["format"] == "rtsed-evaluation" and res["data"]["split"] == "test"
    assert res["model"]["labels"] == list(LABELS) and res["model"]["checkpoint"] == str(checkpoint)
    point = res["operating_points"][0]
    assert point["frame"]["params"]["threshold"] == 0.5
    assert point["segment"]["params"]["segment_s"] == 1.0
    assert point["event"]["params"]["collar_s"] == 0.2
    assert set(point["per_class"]) == set(LABELS)
    assert res["psds1"]["params"]["max_efpr"] == 100.0
    assert 0.0 <= res["summary"]["frame_f1"] <= 1.0  # an untrained model: any score, but a score


def test_cli_broken_checkpoint_exits_2_naming_the_file(dataset_dir, tmp_path, capsys):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint at all")
    code = ev.main(["--model", str(broken), "--test-data", str(dataset_dir / "audio"),
                    str(dataset_dir / "test.tsv"), "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2 and str(broken) in err and "Traceback" not in err
    assert err.count("\n") == 1  # one line


def test_cli_bad_data_exits_2(dataset_dir, checkpoint, tmp_path, capsys):
    tsv = tmp_path / "other.tsv"
    tsv.write_text("filename\tonset\toffset\tevent_label\na.wav\t1.0\t2.0\tdog\nb.wav\t\t\t\nc.wav\t\t\t\n")
    code = ev.main(["--model", str(checkpoint), "--test-data", str(dataset_dir / "audio"), str(tsv),
                    "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2 and "a.wav" in err and "'dog'" in err
    code = ev.main(["--model", str(checkpoint), "--data", str(tmp_path / "nowhere"), "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err


def test_psds_leaves_out_classes_without_reference_events(dataset_dir, checkpoint, oracle):
    oracle.add("noise")
    items = [(i.audio_path, tuple(e for e in i.events if e.event_label == "tone")) for i in _items(dataset_dir)]
    res = ev.evaluate(checkpoint, items)
    ps = res["psds1"]
    assert ps["error"] is None and ps["classes_excluded"] == ["noise"]
    assert set(ps["per_class"]) == {"tone"} and ps["psds"] > 0.99
    assert res["operating_points"][0]["per_class"]["noise"]["psds1"] is None
    assert "left out of PSDS1: ['noise']" in ev.format_report(res)
    assert "PSDS2 (sed_scores_eval): not computed (PSDS2 counts cross-triggers" in ev.format_report(res)


def test_live_decoder_point_merges_flicker_that_a_plain_threshold_splits():
    """Probabilities that dip below threshold for single frames inside each reference event: a
    plain threshold decode splits every event into pieces (event F1 collapses), the live
    decoder with a minimum gap merges them back (the events a user of rtsed.live gets)."""
    n, hop = 500, HOP_S
    probs = np.zeros((n, 2), dtype=np.float32)
    refs = [Event("f.wav", 1.0, 3.0, "tone"), Event("f.wav", 5.0, 8.0, "tone")]
    for e in refs:
        a, b = int(round(e.onset_s / hop)), int(round(e.offset_s / hop))
        probs[a:b, 1] = 0.9
        probs[a + 5:b - 5:7, 1] = 0.2  # one-frame dips every 7 frames
    targets = events_to_frame_targets(refs, n, hop, LABELS)
    out = ev.FileOutput("f.wav", Path("f.wav"), probs, targets, tuple(refs), n * hop)
    reference = [("f.wav", e.onset_s, e.offset_s, e.event_label) for e in refs]
    durations = {"f.wav": n * hop}
    plain = ev._score_point([out], LABELS, hop, "threshold 0.5", 0.5, reference, durations)
    decoder = DecoderConfig(min_gap_s=0.1)
    live = ev._score_point([out], LABELS, hop, "live decoder", None, reference, durations, decoder=decoder)
    assert plain["n_estimated_events"] > 20 and plain["event"]["f1"] < 0.2
    assert live["n_estimated_events"] == 2 and live["event"]["f1"] == pytest.approx(1.0)
    assert live["frame"]["f1"] > plain["frame"]["f1"]
    assert "min gap 0.1 s" in live["event"]["params"]["decode"]


def test_live_decoder_psds_is_scored_on_its_smoothed_scores(tmp_path):
    """One-frame spikes between the reference events: on the raw probabilities every threshold
    that finds the events also reports the spikes (false positives far beyond PSDS's eFPR range),
    so PSDS1 is low; the decoder's 5-frame median, which it thresholds, removes them, and PSDS1 on
    its smoothed scores is high. The live decoder's per-class PSDS are the latter."""
    n, hop = 1500, HOP_S
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.0, 0.3, (n, 2)).astype(np.float32)
    probs[5::10, 1] = 0.95  # a one-frame spike every 0.2 s (not at frame 0: edge padding repeats it)
    refs = [Event("f.wav", 2.0, 6.0, "tone"), Event("f.wav", 12.0, 18.0, "tone"),
            Event("f.wav", 22.0, 25.0, "tone")]
    for e in refs:
        a, b = int(round(e.onset_s / hop)), int(round(e.offset_s / hop))
        probs[a:b, 1] = 0.9
    targets = events_to_frame_targets(refs, n, hop, LABELS)
    out = ev.FileOutput("f.wav", Path("f.wav"), probs, targets, tuple(refs), n * hop)
    ckpt = _make_checkpoint(tmp_path / "smoothing.pt", decoder=DecoderConfig(smoothing_frames=(1, 5)))
    res = ev.evaluate(ckpt, [], outputs=[out])
    raw, smoothed = res["psds1"]["psds"], res["psds1_decoder"]["psds"]
    assert raw < 0.2 and smoothed > 0.9
    live = next(p for p in res["operating_points"] if p["threshold"] == "decoder")
    assert live["per_class"]["tone"]["psds1"] == pytest.approx(res["psds1_decoder"]["per_class"]["tone"])
    assert res["operating_points"][0]["per_class"]["tone"]["psds1"] == pytest.approx(raw)
    assert "decoder's smoothed scores" in ev.format_report(res)


def test_cli_takes_a_bundled_detectors_name(tmp_path, capsys):
    quiet = tmp_path / "quiet"
    quiet.mkdir()
    rng = np.random.default_rng(3)
    sf.write(quiet / "hum.wav", (0.001 * rng.standard_normal(2 * RATE)).astype(np.float32), RATE)
    code = ev.main(["--model", "dnd_7_10", "--false-alarms", str(quiet), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "false alarms" in out.lower()
    code = ev.main(["--model", "dnd_7_1O", "--false-alarms", str(quiet)])  # a typo: letter O for zero
    err = capsys.readouterr().err
    assert code == 2 and "dnd_7_1O" in err and "Bundled detectors: dnd_7_10" in err
    assert err.count("\n") == 1 and "Traceback" not in err
