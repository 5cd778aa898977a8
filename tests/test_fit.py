"""Training: the feature cache, training sequences and normalisation, ``python -m train.fit`` end to
end (epoch lines, checkpoints, overrides), resuming a killed run, DDP, and bad input.

All data are procedural (tone and noise bursts over faint noise, 16 kHz, a few seconds) written
into tmp_path; models are tiny (``--set model.channels=8``). Subprocesses run with one thread
(OMP_NUM_THREADS=1): on the 2 shared cores here, two threads per process are slower, not faster.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import train.fit as fit
from rtsed import load_checkpoint
from rtsed.backends.allocator import find_allocator
from rtsed.config import FrontendConfig
from rtsed.audio.frontend import LogMel
from train.features import SEQUENCE_FRAMES, FeatureCache, FileFeatures, SequenceDataset, normalization_stats
from fit_helpers import LABELS, RATE, TINY, make_scenes, write_split  # tests/ is on sys.path (not a package)

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


# ------------------------------------------------------------------------------------- helpers


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RTSED_ALLOCATOR", "RTSED_ALLOCATOR_REEXEC", "LD_PRELOAD")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_fit(args: list[str], allocator: str | None = "system", timeout: float = 120,
            script: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m train.fit ARGS`` (or ``python SCRIPT ARGS``) in a subprocess: the real command,
    allocator re-exec included."""
    env = _env(**({"RTSED_ALLOCATOR": allocator} if allocator else {}))
    cmd = [sys.executable, *(["-m", "train.fit"] if script is None else script), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def epoch_lines(stdout: str) -> list[dict[str, float]]:
    pattern = re.compile(r"^epoch\s+(\d+)\s+train_loss (\S+)\s+val_loss (\S+)\s+val_F1 (\S+)\s+val_ER (\S+)\s+(\S+) s")
    rows = []
    for line in stdout.splitlines():
        if line.startswith("epoch"):
            m = pattern.match(line)
            assert m, f"epoch line not in the expected form: {line!r}"
            rows.append(dict(zip(("epoch", "train_loss", "val_loss", "val_f1", "val_er", "seconds"),
                                 (float(v) for v in m.groups()))))
    return rows


def _tone_file(path: Path, seconds: float, freq: float) -> np.ndarray:
    x = (0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)
    sf.write(path, x, RATE, subtype="FLOAT")
    return x


# --------------------------------------------------------------------------------- feature cache


def test_feature_cache_hits_invalidation_and_repair(tmp_path):
    fe = FrontendConfig.for_rate(RATE)
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    xa = _tone_file(a, 1.0, 440.0)
    _tone_file(b, 0.5, 1000.0)
    logmel = LogMel(fe)

    first = FeatureCache(tmp_path / "cache", fe)
    fa = first.get(a)
    first.get(b)
    assert (first.hits, first.misses) == (0, 2)
    assert fa.shape == (fe.n_frames(len(xa)), fe.n_mels) and fa.dtype == np.float32
    np.testing.assert_allclose(fa, logmel(torch.from_numpy(xa)).numpy(), rtol=0, atol=0)

    again = FeatureCache(tmp_path / "cache", fe)  # a second run: every file is a hit
    np.testing.assert_array_equal(again.get(a), fa)
    again.get(b)
    assert (again.hits, again.misses) == (2, 0) and again.folder == first.folder

    # Another front end (bands or hop) lands in a fresh folder and recomputes.
    for changed in (fe.replace(n_mels=32), fe.replace(hop_samples=160)):
        other = FeatureCache(tmp_path / "cache", changed)
        assert other.folder != first.folder
        fb = other.get(a)
        assert (other.hits, other.misses) == (0, 1)
        assert fb.shape == (changed.n_frames(len(xa)), changed.n_mels)
        assert json.loads((other.folder / "frontend.json").read_text()) == changed.to_dict()

    # An edited file is recomputed: first with another size, then same size but a new mtime.
    for seconds, freq, bump in ((1.5, 660.0, 0), (1.5, 880.0, 5)):
        x_new = _tone_file(a, seconds, freq)
        st = a.stat()
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 10**9))
        cache = FeatureCache(tmp_path / "cache", fe)
        got = cache.get(a)
        assert (cache.hits, cache.misses) == (0, 1)
        np.testing.assert_array_equal(got, logmel(torch.from_numpy(x_new)).numpy())
        cache.get(b)
        assert cache.hits == 1  # the untouched file is still a hit

    # A damaged entry (empty, truncated, not .npy, wrong shape) is recomputed, never trusted.
    good = FeatureCache(tmp_path / "cache", fe).get(b)
    entry = FeatureCache(tmp_path / "cache", fe)._entry(b)
    raw = entry.read_bytes()
    for damage in (b"", raw[: len(raw) // 2], b"not a numpy file at all",
                   lambda p: np.save(p, np.zeros((3, 7), np.float32))):
        if callable(damage):
            with open(entry, "wb") as f:
                damage(f)
        else:
            entry.write_bytes(damage)
        cache = FeatureCache(tmp_path / "cache", fe)
        np.testing.assert_array_equal(cache.get(b), good)
        assert (cache.hits, cache.misses) == (0, 1)
        np.testing.assert_array_equal(np.load(entry), good)  # and the entry is whole again


_WRITER = """
import os, sys, tempfile
from rtsed.atomic import lock_temporary
fd, tmp = tempfile.mkstemp(dir=sys.argv[1], suffix=".npy.tmp")
lock_temporary(fd)
os.write(fd, b"half of an entry")
print(tmp, flush=True)
sys.stdin.read()  # writing until told otherwise
"""


def test_feature_cache_removes_the_temporaries_of_killed_runs_only(tmp_path):
    """Two real writer processes each hold a half-written ``*.npy.tmp`` in the cache folder, as
    FeatureCache.get does (mkstemp + lock); one is SIGKILLed. Opening the cache removes the dead
    writer's file and keeps the live one's (another run sharing the cache, mid-write) and a fresh
    one not yet locked; once the live writer is killed too, the next start removes its file."""
    fe = FrontendConfig.for_rate(RATE)
    folder = FeatureCache(tmp_path / "cache", fe).folder
    writers, temps = [], []
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(folder)], cwd=REPO, env=_env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        writers.append(proc)
        temps.append(Path(proc.stdout.readline().strip()))
    dead, live = temps
    try:
        writers[0].send_signal(signal.SIGKILL)
        writers[0].wait(timeout=30)
        fresh = folder / "fresh.npy.tmp"  # created a moment ago: its writer may not hold the lock yet
        fresh.write_bytes(b"x")
        old = time.time() - 3600
        for path in (dead, live):
            os.utime(path, (old, old))
        cache = FeatureCache(tmp_path / "cache", fe)
        assert cache.removed_temporaries == [dead]
        assert not dead.exists() and live.exists() and fresh.exists()
    finally:
        for proc in writers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    os.utime(fresh, (old, old))
    assert sorted(FeatureCache(tmp_path / "cache", fe).removed_temporaries) == sorted([fresh, live])
    assert not list(folder.glob("*.tmp"))


def test_a_full_cache_disk_warns_and_still_returns_the_features(tmp_path):
    """The feature cache on a real tmpfs too small for an entry: the features are computed and
    returned all the same, a warning names the file and the full disk, and no temporary file
    is left behind."""
    from mounts import tmpfs  # tests/ is on sys.path (not a package)

    fe = FrontendConfig.for_rate(RATE)
    audio = tmp_path / "long.wav"
    x = _tone_file(audio, 20.0, 440.0)  # 1000 frames of float32 log-mel bands: well over 64 kB
    with tmpfs(tmp_path / "small", "size=64k") as disk:
        cache = FeatureCache(disk, fe)
        with pytest.warns(RuntimeWarning, match=r"long\.wav not cached: the disk is full"):
            feats = cache.get(audio)
        np.testing.assert_array_equal(feats, LogMel(fe)(torch.from_numpy(x)).numpy())
        assert not list(cache.folder.glob("*.npy*"))


# ----------------------------------------------------------------------- sequences, normalisation


def test_sequences_of_1024_frames_padding_masked_and_training_stats():
    assert SEQUENCE_FRAMES == 1024 and fit.Recipe().sequence_frames == 1024
    rng = np.random.default_rng(0)
    lengths = (2500, 300)
    files = [FileFeatures(Path(f"f{i}.wav"), rng.normal(3.0 * i, 1.0 + i, (n, 4)).astype(np.float32),
                          (rng.random((n, 2)) > 0.5).astype(np.float32)) for i, n in enumerate(lengths)]
    norm = normalization_stats(files)
    every = np.concatenate([f.features for f in files]).astype(np.float64)
    np.testing.assert_allclose(norm.mean, every.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(norm.std, every.std(axis=0), rtol=1e-10)  # population std, per band

    data = SequenceDataset(files, norm)
    assert len(data) == 3 + 1  # 2500 = 1024 + 1024 + 452; 300 -> one padded sequence
    mean, std = np.asarray(norm.mean, np.float32), np.asarray(norm.std, np.float32)
    starts = [(0, 0), (0, 1024), (0, 2048), (1, 0)]
    for i, (k, start) in enumerate(starts):
        x, y, mask = data[i]
        assert x.shape == (1024, 4) and y.shape == (1024, 2) and mask.shape == (1024,)
        n = min(1024, lengths[k] - start)
        assert mask[:n].eq(1).all() and mask[n:].eq(0).all()
        np.testing.assert_allclose(x[:n].numpy(), (files[k].features[start:start + n] - mean) / std, atol=1e-6)
        np.testing.assert_array_equal(y[:n].numpy(), files[k].targets[start:start + n])
        assert x[n:].eq(0).all() and y[n:].eq(0).all()  # padding is zero and masked out of the loss
    assert float(sum(data[i][2].sum() for i in range(len(data)))) == sum(lengths)  # no frame lost

    # The masked loss ignores padding: garbage logits in padded frames change nothing.
    x, y, mask = (torch.stack(t) for t in zip(data[2], data[3]))
    logits = torch.randn(2, 1024, 2)
    noisy = torch.where(mask[..., None].bool(), logits, torch.randn(2, 1024, 2) * 100)
    assert torch.equal(fit.masked_bce(logits, y, mask), fit.masked_bce(noisy, y, mask))


def test_progress_bar_shows_loss_and_eta(capsys):
    bar = fit.progress_bar(8, 2, "epoch 1/3", True)
    bar.update(2)
    bar.set_postfix(loss="0.6931", refresh=False)
    bar.refresh()
    err = capsys.readouterr().err
    assert "epoch 1/3" in err and "4/8" in err and "loss=0.6931" in err and "<" in err  # ETA: [elapsed<left]
    bar.close()
    assert fit.progress_bar(8, 0, "quiet", False).disable  # non-main DDP processes print nothing


# ----------------------------------------------------------------------------------- end to end


def test_fit_end_to_end_default_allocator(tmp_path, one_thread):
    """The real command with RTSED_ALLOCATOR unset: it re-executes itself under tcmalloc/jemalloc
    when one is installed, and runs (with a warning) under glibc malloc when none is."""
    data = make_scenes(tmp_path / "data")
    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = run_fit([*TINY, "--data", str(data), "--out", str(out), "--cache-dir", str(cache), "--epochs", "2",
                    "--batch-size", "2", "--set", "model.dropout=0.0"], allocator=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = next((n for n in ("tcmalloc", "jemalloc") if find_allocator(n)), "glibc malloc")
    header = next(line for line in proc.stdout.splitlines() if "parameters" in line)
    assert header.endswith(expected), header
    if expected == "glibc malloc":
        assert "no caching allocator found" in proc.stderr

    rows = epoch_lines(proc.stdout)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["train_loss"] > 0 and r["val_loss"] > 0 and 0 <= r["val_f1"] <= 1 and r["val_er"] >= 0
        assert r["seconds"] >= 0
    assert "epoch 1/2" in proc.stderr  # the progress bar, on stderr

    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt.config.labels == tuple(LABELS)  # manifest order
    assert ckpt.config.model.dropout == 0.0 and ckpt.config.model.channels == 8  # --set reached it
    assert ckpt.config.model.name == "dnd_7_10" and ckpt.config.frontend.sample_rate_hz == RATE
    assert ckpt.model(torch.zeros(1, 50, 40)).shape == (1, 50, 2)
    meta = ckpt.metadata
    assert meta["epoch"] in (1, 2) and len(meta["history"]) == meta["epoch"]
    # best.pt is the epoch of the best validation event F1 of the decoder tuned on that epoch's
    # validation probabilities (ties: the lower validation loss), and carries that decoder.
    assert meta["select"] == "tuned_event_f1"
    assert len(ckpt.config.decoder.on_thresholds) == len(LABELS)
    last_history = torch.load(out / "last.pt", weights_only=True)["progress"]["history"]
    best = max(last_history, key=lambda r: (r["val_event_f1"], -r["val_loss"]))
    assert meta["epoch"] == best["epoch"] and meta["val_event_f1"] == pytest.approx(best["val_event_f1"])
    assert meta["val_loss"] == pytest.approx(best["val_loss"], abs=1e-6)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))  # atomic writes leave nothing behind

    last = torch.load(out / "last.pt", weights_only=True)
    assert last["progress"]["epoch"] == 2 and last["progress"]["step"] == 0
    assert len(last["progress"]["history"]) == 2

    # Normalisation: per-band statistics of the training split only (hand-computed from the
    # cache the run filled: every file is a hit), stored in the checkpoint's config.
    cache_again = FeatureCache(cache, ckpt.config.frontend)
    train = [cache_again.get(p) for p in sorted((data / "train" / "audio").glob("*.wav"))]
    val = [cache_again.get(p) for p in sorted((data / "validate" / "audio").glob("*.wav"))]
    assert (cache_again.hits, cache_again.misses) == (6, 0)
    frames = np.concatenate(train).astype(np.float64)
    norm = ckpt.config.normalization
    np.testing.assert_allclose(norm.mean, frames.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(norm.std, frames.std(axis=0), rtol=1e-6)
    with_val = np.concatenate(train + val).astype(np.float64)
    assert not np.allclose(norm.mean, with_val.mean(axis=0), rtol=1e-6)

    # A second run into the same folder without --resume refuses to overwrite it.
    torch.set_num_threads(1)
    with pytest.raises(SystemExit, match="pass --resume"):
        fit.main([*TINY, "--data", str(data), "--out", str(out), "--cache-dir", str(cache), "--epochs", "1"])


def test_bad_set_overrides_give_clear_errors(tmp_path, one_thread):
    data = make_scenes(tmp_path / "data", n_train=1, n_val=1, seconds=1.0)
    base = ["--data", str(data), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
            "--model", "dnd_7_10", "--epochs", "1"]
    cases = {
        "model.no_such_field=3": "no_such_field",
        "dropout=0.1": "write section.field=value",
        "optimizer.lr=0.1": "section must be 'frontend', 'model', 'mix' or 'augment'",
        "frontend.window=boxcar": "window must be 'hamming' or 'hann'",
        "frontend.n_mels=80": "freq_pools",  # (5, 4, 2) no longer reduces the bands to 1
    }
    for assignment, expected in cases.items():
        with pytest.raises(SystemExit) as exc:
            fit.main([*base, "--set", assignment])
        assert expected in str(exc.value.code), (assignment, exc.value.code)
    with pytest.raises(SystemExit) as exc:
        fit.main([*base, "--model", "dnd_7"])
    assert "unknown model name 'dnd_7'" in str(exc.value.code)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- resume


RESUME_EPOCHS, RESUME_BATCHES = 3, 6  # 6 training files at batch size 1: 18 optimiser steps


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """(train.fit arguments, the uninterrupted run's folder, its process): the reference that the
    killed-and-resumed runs must equal bit for bit. Started here and left running beside the
    killed runs (one thread each: the two cores are used); wait with _finished()."""
    root = tmp_path_factory.mktemp("resume")
    data = make_scenes(root / "data", n_train=RESUME_BATCHES, n_val=2, seconds=2.0)
    cache = root / "cache"
    common = [*TINY, "--data", str(data), "--cache-dir", str(cache), "--epochs", str(RESUME_EPOCHS),
              "--batch-size", "1", "--save-every-s", "0", "--seed", "7"]
    # Fill the cache first so that the runs below do not race to write it.
    FeatureCache(cache, FrontendConfig.for_rate(RATE)).get(next((data / "train" / "audio").glob("*.wav")))
    full = subprocess.Popen([sys.executable, "-m", "train.fit", *common, "--out", str(root / "full")],
                            cwd=REPO, env=_env(RTSED_ALLOCATOR="system"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    yield common, root / "full", full
    if full.poll() is None:
        full.kill()
        full.communicate()


def _finished(run) -> Path:
    """The uninterrupted run's last.pt, once it has ended (it must end well)."""
    _, folder, full = run
    if full.returncode is None:
        _, err = full.communicate(timeout=300)
        assert full.returncode == 0, err[-3000:]
    assert full.returncode == 0
    return folder / "last.pt"


def _writes_of(path: Path, seen: set[tuple[int, int]]) -> int:
    """How many versions of ``path`` have been seen so far: every atomic write renames a new inode
    over it, so (inode, mtime) changes with each one."""
    try:
        st = path.stat()
        seen.add((st.st_ino, st.st_mtime_ns))
    except FileNotFoundError:
        pass
    return len(seen)


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _wait_for_line(lines: queue.Queue, needle: str, timeout: float) -> str:
    """The first line holding ``needle`` from a subprocess's output (read on another thread, so a
    process that never prints it fails the test after ``timeout`` instead of hanging it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no line with {needle!r} within {timeout} s") from None
        assert line is not None, f"the process ended without printing {needle!r}"
        if needle in line:
            return line


def _assert_bit_identical(a: dict, b: dict) -> None:
    """Two last.pt states hold exactly the same weights, optimiser state, RNG and history."""
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, pa in a["optimizer"]["state"].items():
        pb = b["optimizer"]["state"][index]
        assert pa.keys() == pb.keys()
        for key, value in pa.items():
            assert torch.equal(pb[key], value), (index, key)
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    for ra, rb in zip(a["progress"]["history"], b["progress"]["history"], strict=True):
        for key in ("epoch", "train_loss", "val_loss", "val_f1", "val_er"):
            assert ra[key] == rb[key], key  # floats compared exactly
    for key in ("epoch", "step", "loss_sum", "best_val_loss", "best_score", "best_epoch", "bad_epochs"):
        assert a["progress"][key] == b["progress"][key], key


@pytest.mark.parametrize("when", ["between saves", "during a save"])
def test_resume_after_sigkill_is_bit_identical_to_an_uninterrupted_run(tmp_path, uninterrupted_run, when):
    """A real ``python -m train.fit`` subprocess, SIGKILLed from outside, then ``--resume``d, ends
    with exactly (torch.equal) the weights, optimiser state, RNG and history of an uninterrupted
    run: the batch order is a pure function of (seed, epoch) and last.pt carries the RNG state, so
    even dropout (on here, at the default 0.25) draws the same masks.

    "between saves": killed as soon as the 8th last.pt has been seen, somewhere in the steps after
    it (the exact instant varies; the result must not). "during a save": tests/fit_killed.py stops
    halfway through writing the 9th last.pt's temporary file and the kill lands there; last.pt
    must still be the 8th, whole (atomic_torch_save renames only a complete file)."""
    common, _, _ = uninterrupted_run
    part = tmp_path / "part"
    env = _env(RTSED_ALLOCATOR="system")
    script = ["-m", "train.fit"] if when == "between saves" else [str(REPO / "tests" / "fit_killed.py"), "--in-save", "8"]
    killed = subprocess.Popen([sys.executable, *script, *common, "--out", str(part)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(killed.stdout, lines), daemon=True).start()
    try:
        if when == "between saves":
            seen: set[tuple[int, int]] = set()
            deadline = time.monotonic() + 180
            while _writes_of(part / "last.pt", seen) < 8:
                assert killed.poll() is None, f"train.fit ended ({killed.returncode}) before it could be killed"
                assert time.monotonic() < deadline, "train.fit wrote fewer than 8 last.pt in 180 s"
                time.sleep(0.001)
        else:
            _wait_for_line(lines, "waiting for SIGKILL", timeout=180)
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(timeout=30) == -signal.SIGKILL
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait()

    state = torch.load(part / "last.pt", weights_only=True)  # a whole file, whatever the kill interrupted
    at = (state["progress"]["epoch"], state["progress"]["step"])
    # last.pt is written after every step and at each epoch's end: its 8th version is epoch 2 (0-based
    # 1) after 1 step. At least that far, and not at the end of the run.
    assert (1, 1) <= at < (RESUME_EPOCHS - 1, RESUME_BATCHES), at
    leftovers = list(part.glob(".last.pt.*.tmp"))
    if when == "during a save":
        assert at == (1, 1)  # the 8th write: the 9th never replaced it
        assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size < (part / "last.pt").stat().st_size

    resumed = run_fit([*common, "--out", str(part), "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert not list(part.glob(".*.tmp")), "the killed save's temporary file is removed when the run resumes"
    if when == "during a save":
        assert f"removed {leftovers[0].name}" in resumed.stdout
    assert [r["epoch"] for r in epoch_lines(resumed.stdout)][-1] == RESUME_EPOCHS

    _assert_bit_identical(torch.load(_finished(uninterrupted_run), weights_only=True),
                          torch.load(part / "last.pt", weights_only=True))
    assert load_checkpoint(part / "best.pt").metadata["epoch"] == \
        load_checkpoint(_finished(uninterrupted_run).with_name("best.pt")).metadata["epoch"]


# ------------------------------------------------------------------------------------------- DDP


def _torchrun(args: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    if not TORCHRUN.exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(RTSED_ALLOCATOR="system"), capture_output=True, text=True,
                          timeout=timeout)


def test_ddp_step_on_two_shards_equals_one_process_on_the_batch(tmp_path):
    """One train_step under DDP (2 CPU processes, gloo), each on an equal half of the batch, with
    BatchNorm frozen (eval mode: running statistics) and dropout off, gives the weights (atol 1e-5)
    and gradients of one process stepping on the whole batch. That holds even though the padded
    last sequence leaves rank 1 fewer real frames: train_step normalises by the global frame count.

    What differs in normal training: BatchNorm in train mode normalises each process's shard by that
    shard's own batch statistics (and updates its running statistics from them), so gradients and
    running statistics differ from one process on the whole batch (checked below: they do differ).
    SyncBatchNorm would share the statistics but runs on CUDA only, so CPU DDP training is not
    bitwise the single-process recipe; dropout masks are also drawn per process."""
    out = tmp_path / "ddp.pt"
    proc = _torchrun([str(REPO / "tests" / "ddp_step.py"), str(out)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    res = torch.load(out, weights_only=True)
    assert res["world"] == 2
    from rtsed.models.model import build_model

    sys.path.insert(0, str(REPO / "tests"))
    try:
        from ddp_step import MODEL
    finally:
        sys.path.pop(0)
    diffs = {}
    for mode in ("frozen", "train"):
        model = build_model(MODEL["name"], **{k: v for k, v in MODEL.items() if k != "name"})
        model.load_state_dict(res[f"{mode}_init"])
        model.train(mode == "train")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss = fit.train_step(model, optimizer, res["x"], res["y"], res["mask"])
        grads = {n: p.grad for n, p in model.named_parameters()}
        if mode == "frozen":
            assert res["frozen_loss"] == pytest.approx(loss, rel=1e-5)
            for key, value in model.state_dict().items():
                torch.testing.assert_close(res["frozen_state"][key], value, rtol=0, atol=1e-5, msg=key)
            for key, value in grads.items():
                torch.testing.assert_close(res["frozen_grads"][key], value, rtol=1e-4, atol=1e-6, msg=key)
        diffs[mode] = max(float((res[f"{mode}_grads"][k] - g).abs().max()) for k, g in grads.items())
        diffs[mode + "_bn"] = max(float((res[f"{mode}_state"][k] - v).abs().max())
                                  for k, v in model.state_dict().items() if "running" in k)
    assert diffs["train"] > 1e-4 and diffs["train_bn"] > 1e-4, diffs  # per-process BN statistics
    assert diffs["frozen_bn"] == 0.0


def test_torchrun_fit_end_to_end_on_cpu(tmp_path):
    """``torchrun --nproc_per_node 2 -m train.fit`` (gloo) on DCASE-format splits: one epoch, one set
    of epoch lines (rank 0 only), one best.pt and last.pt, no leftover temporary files."""
    rng = np.random.default_rng(3)
    train_audio, train_tsv = write_split(tmp_path / "train", 4, 2.0, rng)
    val_audio, val_tsv = write_split(tmp_path / "val", 2, 2.0, rng)
    out = tmp_path / "run"
    proc = _torchrun(["-m", "train.fit", *TINY, "--train-data", str(train_audio), str(train_tsv),
                      "--val-data", str(val_audio), str(val_tsv), "--labels", ",".join(LABELS),
                      "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
                      "--batch-size", "2"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "2 process(es)" in proc.stdout
    assert [r["epoch"] for r in epoch_lines(proc.stdout)] == [1]
    assert proc.stdout.count("*best") == 1
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt"]
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt.config.labels == tuple(LABELS) and ckpt.metadata["epoch"] == 1


# ------------------------------------------------------------------------------------- bad input


def _bad_case(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """A small data set with one defect; returns (train.fit data arguments, the path the error must name)."""
    data = make_scenes(tmp_path / case, n_train=2, n_val=1, seconds=1.5)
    audio, tsv = data / "train" / "audio", data / "train" / "annotations.tsv"
    victim = audio / "train_1.wav"
    args = ["--data", str(data)]
    if case == "unreadable":
        victim.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    elif case == "silent":
        sf.write(victim, np.zeros(RATE, np.float32), RATE)
    elif case == "past_end":
        with tsv.open("a") as f:
            f.write("train_1.wav\t4.0\t4.5\tbeep\n")  # the file is 1.5 s long
        victim = tsv
    elif case == "unknown_label":
        with tsv.open("a") as f:
            f.write("train_1.wav\t0.1\t0.4\tmeow\n")
        victim = tsv
        args += ["--labels", ",".join(LABELS)]
    elif case == "unlisted":  # an audio file without annotations is an error, not a silent skip
        sf.write(audio / "stray.wav", 0.1 * np.ones(RATE, np.float32), RATE)
        victim = audio / "stray.wav"
    elif case == "empty_val_tsv":
        victim = data / "validate" / "annotations.tsv"
        victim.write_text("filename\tonset\toffset\tevent_label\n")
    elif case == "no_val_split":
        for p in sorted((data / "validate").rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        (data / "validate").rmdir()
        victim = data
    return args, str(victim)


BAD_CASES = {
    "unreadable": "cannot read audio",
    "silent": "silent",
    "past_end": "outside the file",
    "unknown_label": "unknown label 'meow'",
    "unlisted": "not in",
    "empty_val_tsv": "split 'validate' would be empty",
    "no_val_split": "split 'validate' is empty",
}


def test_bad_input_names_the_file(tmp_path, one_thread):
    for case, expected in BAD_CASES.items():
        args, victim = _bad_case(tmp_path, case)
        with pytest.raises(SystemExit) as exc:
            fit.main([*args, "--out", str(tmp_path / f"run_{case}"), "--cache-dir", str(tmp_path / "cache"),
                      *TINY, "--epochs", "1"])
        message = str(exc.value.code)
        assert expected in message and victim in message, (case, message)
        assert not (tmp_path / f"run_{case}" / "last.pt").exists()


def test_bad_input_from_the_command_line_exits_nonzero_without_traceback(tmp_path):
    args, victim = _bad_case(tmp_path, "unknown_label")
    proc = run_fit([*args, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *TINY])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and victim in proc.stderr and "unknown label 'meow'" in proc.stderr


def test_bf16_training_converges_like_fp32(tmp_path, one_thread):
    """--precision bf16 (the big GEMMs in bfloat16 under CPU autocast, everything else float32)
    trains as fp32 does: the same recipe and data, the loss falls as far and the detector is as
    good on the validation scenes."""
    data = make_scenes(tmp_path / "data", n_train=6, n_val=2, seconds=10.0, seed=3)
    results = {}
    for precision in ("fp32", "bf16"):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            fit.main(["--model", "dnd_7_10", "--set", "model.channels=16", "--set", "model.dropout=0.0",
                      "--data", str(data), "--out", str(tmp_path / precision), "--cache-dir", str(tmp_path / "cache"),
                      "--epochs", "25", "--batch-size", "2", "--lr", "3e-3", "--patience", "1000",
                      "--precision", precision])
        header = next(line for line in stdout.getvalue().splitlines() if "parameters" in line)
        assert f", {precision}, " in header, header
        results[precision] = epoch_lines(stdout.getvalue())
    fp32, bf16 = results["fp32"], results["bf16"]
    assert bf16[-1]["train_loss"] < 0.5 * bf16[0]["train_loss"], bf16
    assert bf16[-1]["train_loss"] == pytest.approx(fp32[-1]["train_loss"], rel=0.25, abs=0.02)
    assert max(r["val_f1"] for r in bf16) >= max(r["val_f1"] for r in fp32) - 0.05
    assert max(r["val_f1"] for r in bf16) > 0.8, bf16


def test_bf16_on_a_cpu_without_native_bf16_warns(tmp_path, one_thread, monkeypatch):
    data = make_scenes(tmp_path / "data", n_train=2, n_val=1, seconds=2.0)
    monkeypatch.setattr(fit, "cpu_has_bf16_gemm", lambda: False)
    with pytest.warns(RuntimeWarning, match="emulated"), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        fit.main([*TINY, "--data", str(data), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                  "--epochs", "1", "--batch-size", "2", "--precision", "bf16"])
    assert isinstance(fit.cpu_has_bf16_gemm(), bool)
