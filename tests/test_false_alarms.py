"""False alarms per minute (train.false_alarms, ``train.evaluate --false-alarms``): events are
counted against each file's category, from meta.csv or the sub-folder name, through the
checkpoint's own decoder. Procedural audio and a scripted model: no ../shared data needed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from rtsed.models.checkpoint import load_checkpoint, save_checkpoint
from rtsed.config import DecoderConfig, DetectorConfig, FrontendConfig, ModelConfig
from rtsed.models.model import SEDModel
from train import false_alarms as fa

RATE = 16000
LABELS = ("speech", "tone")
FRONTEND = FrontendConfig.for_rate(RATE)
FILES = {"speech/a.wav": 5.0, "music/b.flac": 6.0, "ambience/c.wav": 7.0}


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for name, seconds in FILES.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, (0.01 * rng.standard_normal(int(seconds * RATE))).astype(np.float32), RATE)
    return tmp_path


@pytest.fixture
def checkpoint(tmp_path):
    model_cfg = ModelConfig.from_name("dnd_3_1_causal", n_classes=2, channels=8)
    # min_event_s drops the scripted 2-frame blip: the checkpoint's decoder is what is scored.
    config = DetectorConfig(frontend=FRONTEND, model=model_cfg, labels=LABELS,
                            decoder=DecoderConfig(min_event_s=0.1))
    save_checkpoint(tmp_path / "m.pt", SEDModel(model_cfg).eval(), config)
    return load_checkpoint(tmp_path / "m.pt")


@pytest.fixture
def scripted(monkeypatch):
    """Every file: 'tone' fires on frames 10-30 and 60-62 (a blip), 'speech' on frames 50-100."""
    def logits(detector, features):
        out = torch.full((features.shape[0], 2), -10.0)
        out[10:30, 1] = out[60:62, 1] = 10.0
        out[50:100, 0] = 10.0
        return out

    monkeypatch.setattr(fa, "file_logits", logits)


def _minutes(seconds: float) -> float:
    return FRONTEND.n_frames(int(seconds * RATE)) * FRONTEND.hop_s / 60


def test_events_count_against_the_file_category(folder, checkpoint, scripted):
    result = fa.false_alarms(checkpoint, folder)
    # speech file: its speech event is right, the tone is false; music and ambience: both false.
    assert result["false_alarms"] == 5
    assert result["per_category"]["speech"]["false_alarms"] == 1
    assert result["per_category"]["music"]["false_alarms"] == 2
    assert result["per_label"]["speech"] == {"false_alarms": 2, "per_minute": pytest.approx(2 / result["minutes"]),
                                             "right": 1}
    minutes = sum(_minutes(s) for s in FILES.values())
    assert result["minutes"] == pytest.approx(minutes)
    assert result["per_minute"] == pytest.approx(5 / minutes)
    assert result["per_category"]["ambience"]["minutes"] == pytest.approx(_minutes(7.0))


def test_meta_csv_category_wins_over_the_folder_name(folder, checkpoint, scripted):
    (folder / "meta.csv").write_text("filename,category\nmusic/b.flac,speech\n", encoding="utf-8")
    result = fa.false_alarms(checkpoint, folder)
    assert result["per_category"]["speech"]["files"] == 2
    assert result["false_alarms"] == 4


def test_cli_prints_and_writes_json(folder, checkpoint, scripted, tmp_path, capsys):
    pytest.importorskip("sed_eval")
    from train import evaluate

    out = tmp_path / "fa.json"
    assert evaluate.main(["--model", str(checkpoint.path), "--false-alarms", str(folder), "--json", str(out)]) == 0
    assert "5 events in" in capsys.readouterr().out
    assert json.loads(out.read_text())["false_alarms"]["false_alarms"] == 5


def test_a_folder_without_audio_is_a_clear_error(tmp_path, checkpoint):
    with pytest.raises(fa.FalseAlarmError, match="no audio files"):
        fa.false_alarms(checkpoint, tmp_path)
    with pytest.raises(fa.FalseAlarmError, match="no such folder"):
        fa.false_alarms(checkpoint, tmp_path / "missing")
