"""train.fit's class list: a label heard only in validation/test is refused, a rare or typo-like
training label is warned about with the closest known label, and --labels states intent. Run
through the command line on tiny procedural DCASE splits."""

from __future__ import annotations

import numpy as np
import pytest

import train.fit as fit
from procedural import write_dcase_split  # tests/ is on sys.path (not a package)
from fit_helpers import RATE, TINY, beep_hiss_scene  # tests/ is on sys.path
from train.data_sources import open_dataset
from train.label_check import LabelError, check_labels


def _splits(tmp_path, train_extra: str = "", val_extra: str = ""):
    rng = np.random.default_rng(0)
    train = write_dcase_split(tmp_path / "train", 2, 1.5, rng, beep_hiss_scene, RATE)
    val = write_dcase_split(tmp_path / "validate", 1, 1.5, rng, beep_hiss_scene, RATE)
    for (_, tsv), extra in ((train, train_extra), (val, val_extra)):
        with tsv.open("a") as f:
            f.write(extra)
    return ["--train-data", *map(str, train), "--val-data", *map(str, val)]


def test_a_validation_only_label_is_refused_from_the_command_line(tmp_path, one_thread):
    """SystemExit with a message: the command exits 1 with it on stderr, no traceback (as every
    data error of train.fit, tests/test_fit.py)."""
    args = _splits(tmp_path, val_extra="validate_0.wav\t0.1\t0.4\tmeow\nvalidate_0.wav\t0.6\t0.9\tmeow\n")
    with pytest.raises(SystemExit) as exc:
        fit.main([*args, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *TINY])
    message = str(exc.value.code)
    assert message.startswith("data error: labels found only in validation/test, never in training: "
                              "'meow' (validate: 2 events")
    assert "--labels" in message
    assert not (tmp_path / "run").exists()


def test_a_typo_in_training_labels_is_named_with_its_closest_label(tmp_path, capsys, one_thread):
    args = _splits(tmp_path, train_extra="train_1.wav\t0.1\t0.3\tbepe\n")
    fit.main([*args, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *TINY,
              "--epochs", "0"])  # the check runs before training: no epoch needed to see it
    err = capsys.readouterr().err
    assert "label 'bepe' has only 1 training event; closest known label: 'beep': a typo" in err


def test_listed_labels_are_the_users_intent(tmp_path):
    args = _splits(tmp_path, train_extra="train_1.wav\t0.1\t0.3\tbepe\n",
                   val_extra="validate_0.wav\t0.1\t0.4\tmeow\n")

    def dataset(labels=None):
        ns = fit.build_parser().parse_args([*args, "--out", "x", *(["--labels", labels] if labels else [])])
        return open_dataset(ns)

    with pytest.raises(LabelError, match="'meow'"):
        check_labels(dataset())
    listed = "beep,bepe,hiss,meow"
    warnings = check_labels(dataset(listed), listed.split(","))
    assert warnings == ["label 'meow' is listed in --labels but has no training events: its output will stay untrained"]


def test_case_and_separator_twins_are_warned_about_even_when_common(tmp_path):
    args = _splits(tmp_path, train_extra="".join(f"train_0.wav\t0.{i}\t0.{i}5\tBeep\n" for i in range(1, 5)))
    ns = fit.build_parser().parse_args([*args, "--out", "x"])
    warnings = check_labels(open_dataset(ns))
    assert any("label 'Beep' has 4 training events, and it differs from 'beep' only by case" in w for w in warnings)
