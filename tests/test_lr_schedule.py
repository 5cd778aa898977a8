"""train.fit's learning-rate schedule on a plateau of the selection score (``--lr-decay``).

Tiny procedural scenes and models (see test_fit.py), trained in-process with one thread.
``--select loss`` makes the selection score continuous, so "improved" is a plain comparison of
validation losses the test can replay from the saved history.
"""

from __future__ import annotations

import pytest
import torch

import train.fit as fit
from fit_helpers import TINY, make_scenes  # tests/ is on sys.path


def _fit(data, out, cache, *extra: str) -> None:
    fit.main([*TINY, "--data", str(data), "--out", str(out), "--cache-dir", str(cache), "--batch-size", "2",
              "--select", "loss", "--set", "model.dropout=0.0", *extra])


def _history(out) -> list[dict]:
    return torch.load(out / "last.pt", weights_only=True)["progress"]["history"]


def test_lr_halves_after_each_epoch_without_improvement_and_resumes_exactly(tmp_path, one_thread):
    data = make_scenes(tmp_path / "data", n_train=2, n_val=1, seconds=2.0)
    cache = tmp_path / "cache"
    schedule = ("--lr", "0.5", "--lr-decay", "0.5", "--lr-decay-patience", "0", "--min-lr", "0.1")
    # lr 0.5 on a tiny model: validation loss goes up as well as down, so both branches of the rule run.
    _fit(data, tmp_path / "whole", cache, "--epochs", "6", *schedule)
    history = _history(tmp_path / "whole")
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6]

    # Replay the rule: the lr of epoch e+1 is halved (floored at --min-lr) when epoch e's validation
    # loss did not beat every earlier one.
    best, lr, decays = float("inf"), 0.5, 0
    for record in history:
        assert record["lr"] == pytest.approx(lr, rel=1e-12), history
        if record["val_loss"] < best:
            best = record["val_loss"]
        else:
            lr, decays = max(lr * 0.5, 0.1), decays + 1
    assert decays >= 1, f"no epoch without improvement in {history}: the decay branch never ran"

    # Stopped after 3 epochs and resumed: the same lrs, the same weights, bit for bit.
    _fit(data, tmp_path / "split", cache, "--epochs", "3", *schedule)
    _fit(data, tmp_path / "split", cache, "--epochs", "6", "--resume", *schedule)
    assert [r["lr"] for r in _history(tmp_path / "split")] == [r["lr"] for r in history]
    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert whole["scheduler"] == split["scheduler"]
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, split["model"][name]), name


def test_a_constant_lr_run_resumed_with_a_schedule_starts_from_its_best(tmp_path, one_thread):
    data = make_scenes(tmp_path / "data", n_train=2, n_val=1, seconds=2.0)
    out, cache = tmp_path / "run", tmp_path / "cache"
    _fit(data, out, cache, "--epochs", "2", "--lr", "0.05")
    before = torch.load(out / "last.pt", weights_only=True)
    assert before["scheduler"] is None and all(r["lr"] == 0.05 for r in before["progress"]["history"])
    _fit(data, out, cache, "--epochs", "3", "--resume", "--lr-decay", "0.5", "--lr-decay-patience", "0")
    after = torch.load(out / "last.pt", weights_only=True)
    progress = after["progress"]
    # The schedule's best is the run's best score (minus the validation loss under --select loss).
    assert after["scheduler"]["best"] == pytest.approx(progress["best_score"])
    third = progress["history"][2]
    halved = third["epoch"] != progress["best_epoch"]
    assert optimizer_lr(after) == pytest.approx(0.025 if halved else 0.05)


def optimizer_lr(state: dict) -> float:
    return state["optimizer"]["param_groups"][0]["lr"]


@pytest.mark.parametrize("factor", ["0", "1.5", "-0.5"])
def test_a_decay_factor_outside_0_1_is_refused(tmp_path, factor):
    with pytest.raises(SystemExit, match=r"--lr-decay .*factor in \(0, 1\]"):
        fit.main([*TINY, "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--lr-decay", factor])
