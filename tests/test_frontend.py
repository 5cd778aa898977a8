"""The log-mel front end against librosa (offline) and against itself (streaming == offline).

Tolerances, all on natural-log mel values unless said otherwise:

* offline vs librosa: |ours - ref| <= 1e-5, with ref = librosa computed in float64. An error in the
  log domain is the relative error of the mel power, so 1e-5 is a relative power error of 1e-5,
  about 170 fp32 ulps (eps = 6e-8). fp32 FFT rounding is absolute, O(eps log2 n) of the frame's
  energy, so a band's relative error grows as it sinks below the frame's loudest band: 1e-5 holds
  for signals with a noise floor (the scenes below, bands within ~40 dB; measured max 4.3e-6) and
  leaves no room for a wrong window, padding, mel matrix or framing (those move values by 1e-2 or
  more). Pure tones put bands 100+ dB down, where even float64-vs-float32 differs by 1e-2 in log;
  there the test bounds the power error relative to the frame's loudest band instead: 2e-6
  (measured max 3.3e-7).
* streaming vs offline: |stream - offline| <= 1e-5. Both run `LogMel.frames` on the same float32
  samples, but the FFT and matmul see 1 row where offline sees T, and pocketfft/BLAS pick their
  summation order by batch shape, so equality is not bitwise. Measured max 1.9e-6 (tiny 64-point
  FFT), <= 1e-6 at the real configs.
* mel matrix vs librosa.filters.mel: rtol 1e-6 (about 8 ulps); measured: bitwise equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtsed.config import FrontendConfig
from rtsed.audio.frontend import LogMel, LogMelStream, mel_filterbank

try:  # a test dependency (pyproject's `test` extra); only the comparisons with it skip without it
    import librosa
except ImportError:  # pragma: no cover
    librosa = None
needs_librosa = pytest.mark.skipif(librosa is None, reason="needs librosa (pip install -e .[test])")

LOG_ATOL_VS_LIBROSA = 1e-5
LOG_ATOL_STREAM = 1e-5
POWER_TOL_TONES = 2e-6  # |P - P_ref| / max_band P_ref, per frame

PAPER = FrontendConfig()  # 44.1 kHz, 1764 / 882, 40 bands
CLIPS = FrontendConfig.for_rate(16000)  # 640 / 320
WIDE_FFT = FrontendConfig.for_rate(16000, n_fft=1024, n_mels=64, fmin_hz=50.0, fmax_hz=7000.0)
HANN_FFT = FrontendConfig(n_fft=2048, window="hann")
MEL64 = FrontendConfig.for_rate(22050, n_mels=64, fmin_hz=20.0, fmax_hz=8000.0)
# Small enough for hypothesis to run hundreds of pushes per example.
TINY = FrontendConfig(sample_rate_hz=8000, window_samples=48, hop_samples=20, n_mels=8, n_fft=64)
GAPPED = FrontendConfig(sample_rate_hz=8000, window_samples=32, hop_samples=45, n_mels=4)  # hop > window


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run these tests on one intra-op thread. With 2 threads on a loaded 2-core machine, an FFT or
    matmul over a few frames waits milliseconds for its helper thread (measured: 8 ms vs 8 us for a
    3 x 640 rfft), which made this file 10x slower without testing anything more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scene(config: FrontendConfig, seconds: float, seed: int = 0) -> np.ndarray:
    """(N,) float32: white noise + two steady tones + a linear chirp to near Nyquist, with 0.2 s of
    digital silence (exact zeros, so log(log_offset) frames are covered too)."""
    sr = config.sample_rate_hz
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    top_hz = 0.45 * sr
    y = 0.05 * rng.standard_normal(t.size)
    y += 0.3 * np.sin(2 * np.pi * 440.0 * t) + 0.2 * np.sin(2 * np.pi * 3150.5 * t + 1.0)
    y += 0.2 * np.sin(2 * np.pi * (100.0 * t + 0.5 * (top_hz - 100.0) / seconds * t**2))
    y[int(0.3 * sr) : int(0.5 * sr)] = 0.0
    return y.astype(np.float32)


def librosa_logmel(y: np.ndarray, config: FrontendConfig) -> np.ndarray:
    """(T, n_mels) float64 reference. librosa centres a short window inside its n_fft-sample frame,
    so its frame t starts (n_fft - window) // 2 samples after ours: pad y by that much on the left
    (and the rest on the right) to put both on our framing convention."""
    extra = config.fft_size - config.window_samples
    padded = np.pad(y.astype(np.float64), (extra // 2, extra - extra // 2))
    mel = librosa.feature.melspectrogram(
        y=padded, sr=config.sample_rate_hz, n_fft=config.fft_size, hop_length=config.hop_samples,
        win_length=config.window_samples, window=config.window, center=False, power=2.0,
        n_mels=config.n_mels, fmin=config.fmin_hz, fmax=config.fmax, htk=False, norm="slaney",
    )
    return np.log(mel + config.log_offset).T


def stream_all(stream: LogMelStream, chunks) -> np.ndarray:
    outs = [stream.push(c) for c in chunks]
    for out in outs:
        assert out.dtype == torch.float32 and out.dim() == 2 and out.shape[1] == stream.config.n_mels
    return torch.cat(outs).numpy()


# --- mel filter bank -----------------------------------------------------------------------------------


@needs_librosa
@pytest.mark.parametrize(
    "config", [PAPER, CLIPS, WIDE_FFT, HANN_FFT, MEL64, TINY],
    ids=["44k1-1764", "16k-640", "16k-nfft1024-mel64-fmin-fmax", "44k1-nfft2048",
         "22k05-mel64-fmin-fmax", "8k-tiny"],
)
def test_mel_filterbank_matches_librosa(config):
    ours = mel_filterbank(config)
    ref = librosa.filters.mel(
        sr=config.sample_rate_hz, n_fft=config.fft_size, n_mels=config.n_mels, fmin=config.fmin_hz,
        fmax=config.fmax, htk=False, norm="slaney",
    )
    assert ours.dtype == np.float32 and ours.shape == (config.n_mels, config.fft_size // 2 + 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)
    assert (ours.max(axis=1) > 0).all()  # no empty band in these configs


def test_mel_filterbank_warns_on_empty_bands():
    crowded = FrontendConfig(sample_rate_hz=8000, window_samples=32, hop_samples=16, n_mels=40)
    with pytest.warns(UserWarning, match="catch no FFT bin"):
        mel_filterbank(crowded)


# --- offline log-mel -----------------------------------------------------------------------------------


@needs_librosa
@pytest.mark.parametrize(
    "config, seconds", [(PAPER, 3.0), (CLIPS, 3.0), (WIDE_FFT, 2.0), (HANN_FFT, 2.0), (MEL64, 2.0)],
    ids=["44k1-1764-882", "16k-640-320", "16k-nfft1024-mel64", "44k1-hann-nfft2048", "22k05-mel64"],
)
def test_logmel_matches_librosa(config, seconds):
    y = scene(config, seconds)
    y = y[: len(y) - 123]  # a trailing partial frame, to be dropped
    ours = LogMel(config)(torch.from_numpy(y))
    ref = librosa_logmel(y, config)
    assert ours.dtype == torch.float32
    assert ours.shape == (config.n_frames(len(y)), config.n_mels) == ref.shape
    err = np.abs(ours.numpy() - ref)
    assert err.max() <= LOG_ATOL_VS_LIBROSA, f"max |log-mel error| {err.max():.3g}"
    # The silent stretch gives exactly log(log_offset): zero power, not FFT noise.
    silent = config.n_frames(int(0.45 * config.sample_rate_hz)) - 1
    assert (ours[silent] == np.float32(np.log(config.log_offset))).all()


@needs_librosa
@pytest.mark.parametrize("config", [PAPER, CLIPS, HANN_FFT], ids=["44k1", "16k", "44k1-hann-nfft2048"])
def test_logmel_matches_librosa_on_pure_tones(config):
    sr = config.sample_rate_hz
    t = np.arange(sr) / sr
    for hz in (60.0, 440.0, 5000.0, 0.4 * sr):
        y = (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
        ours = np.exp(LogMel(config)(torch.from_numpy(y)).numpy().astype(np.float64))
        ref = np.exp(librosa_logmel(y, config))
        err = np.abs(ours - ref) / ref.max(axis=1, keepdims=True)
        assert err.max() <= POWER_TOL_TONES, f"{hz} Hz: power error {err.max():.3g} of the frame's peak band"


def test_logmel_frame_count_and_framing():
    config = CLIPS
    lm = LogMel(config)
    for n in (0, 1, 639, 640, 641, 959, 960, 961, 16000):
        assert lm(torch.zeros(n)).shape == (config.n_frames(n), config.n_mels)
    # Frame t reads exactly samples [t * hop, t * hop + window): an impulse at sample s lights up
    # the frames whose span contains it and no others.
    s = 1000
    x = torch.zeros(4000)
    x[s] = 1.0
    lit = (lm(x) > np.log(config.log_offset) + 1).any(dim=1).nonzero().flatten().tolist()
    assert lit == [t for t in range(config.n_frames(4000)) if t * 320 <= s < t * 320 + 640] == [2, 3]


def test_logmel_batched_and_short_inputs():
    config = CLIPS
    lm = LogMel(config)
    y = torch.from_numpy(scene(config, 0.5))
    batch = torch.stack([y, 0.5 * y, y.flip(0)]).reshape(3, 1, -1)
    out = lm(batch)
    assert out.shape == (3, 1, config.n_frames(y.numel()), config.n_mels)
    for i in range(3):
        np.testing.assert_allclose(out[i, 0].numpy(), lm(batch[i, 0]).numpy(), rtol=0, atol=LOG_ATOL_STREAM)
    assert lm(torch.zeros(2, 5, 639)).shape == (2, 5, 0, config.n_mels)
    # float64 input is accepted and computed in float32
    assert lm(y.double()).dtype == torch.float32


@needs_librosa
def test_logmel_buffers_are_non_persistent():
    lm = LogMel(PAPER)
    assert dict(lm.state_dict()) == {}
    assert {name for name, _ in lm.named_buffers()} == {"window", "mel_basis"}
    assert lm.mel_basis.shape == (PAPER.fft_size // 2 + 1, PAPER.n_mels)
    # periodic Hamming, as scipy/librosa's 'hamming' with fftbins=True
    reference = librosa.filters.get_window("hamming", 1764)
    np.testing.assert_allclose(lm.window.numpy(), reference, rtol=0, atol=1e-7)


# --- streaming -----------------------------------------------------------------------------------------


@st.composite
def chunkings(draw, n: int):
    """Chunk sizes summing to n: one chunk, all ones (short signals only), or random odd/even sizes."""
    kind = draw(st.sampled_from(["whole", "ones", "random", "random"] if n <= 400 else ["whole", "random"]))
    if kind == "whole" or n == 0:
        return [n]
    if kind == "ones":
        return [1] * n
    sizes = []
    while sum(sizes) < n:
        sizes.append(draw(st.integers(0, 3 * 48 + 7)))  # zero-sized pushes too
    sizes[-1] -= sum(sizes) - n
    return sizes


def to_chunks(y: np.ndarray, sizes, kinds):
    """Split y by sizes, alternating input types: numpy float32/float64 and torch float32/float64."""
    out, start = [], 0
    for i, size in enumerate(sizes):
        piece = y[start : start + size]
        start += size
        kind = kinds[i % len(kinds)]
        if kind == "np64":
            piece = piece.astype(np.float64)
        elif kind == "torch32":
            piece = torch.from_numpy(piece.copy())
        elif kind == "torch64":
            piece = torch.from_numpy(piece.astype(np.float64))
        out.append(piece)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_stream_equals_offline(data):
    config = data.draw(st.sampled_from([TINY, GAPPED]), label="config")
    n = data.draw(st.integers(0, 1500), label="n_samples")
    y = scene(config, 1.0, seed=data.draw(st.integers(0, 3)))[:n]
    sizes = data.draw(chunkings(n), label="sizes")
    input_kinds = st.sampled_from(["np32", "np64", "torch32", "torch64"])
    kinds = data.draw(st.lists(input_kinds, min_size=1, max_size=4), label="input types")
    offline = LogMel(config)(torch.from_numpy(y)).numpy()

    stream = LogMelStream(config)
    if data.draw(st.booleans(), label="reset mid-stream"):
        # Half a stream of something else, then reset: nothing of it may leak into the next stream.
        junk = to_chunks(scene(config, 0.1, seed=9), data.draw(chunkings(800)), kinds)
        stream_all(stream, junk)
        stream.reset()
        assert stream.frames_emitted == 0 and stream.samples_seen == 0

    outs, seen = [], 0
    for chunk in to_chunks(y, sizes, kinds):
        out = stream.push(chunk)
        seen += len(chunk)
        outs.append(out)
        assert stream.samples_seen == seen
        assert stream.frames_emitted == config.n_frames(seen) == sum(len(o) for o in outs)
    streamed = torch.cat(outs).numpy()
    assert streamed.shape == offline.shape == (config.n_frames(n), config.n_mels)
    np.testing.assert_allclose(streamed, offline, rtol=0, atol=LOG_ATOL_STREAM)


@pytest.mark.parametrize("config", [PAPER, CLIPS, WIDE_FFT], ids=["44k1", "16k", "16k-nfft1024"])
def test_stream_equals_offline_real_configs(config):
    """Realistic configs and block sizes: a 10 ms audio callback, odd blocks, blocks longer than the
    window (the concatenation path), all one stream."""
    y = scene(config, 2.0, seed=1)
    sr = config.sample_rate_hz
    rng = np.random.default_rng(0)
    sizes = [sr // 100] * 20 + list(rng.integers(1, 2 * config.window_samples, 30)) + [7, 1, 1, 3]
    sizes.append(len(y) - sum(sizes))
    assert sizes[-1] > 0
    stream = LogMelStream(config)
    streamed = stream_all(stream, to_chunks(y, sizes, ["np32", "np64", "torch32"]))
    offline = LogMel(config)(torch.from_numpy(y)).numpy()
    assert streamed.shape == offline.shape
    np.testing.assert_allclose(streamed, offline, rtol=0, atol=LOG_ATOL_STREAM)
    # Pending samples never exceed window - 1 (hop <= window here).
    assert stream.samples_seen - stream.frames_emitted * config.hop_samples <= config.window_samples - 1


def test_stream_short_input_yields_no_frames():
    stream = LogMelStream(CLIPS)
    for size in (0, 1, 100, 538):
        out = stream.push(np.zeros(size, dtype=np.float32))
        assert out.shape == (0, CLIPS.n_mels) and out.dtype == torch.float32
    assert stream.samples_seen == 639 and stream.frames_emitted == 0
    assert stream.push(np.zeros(1, dtype=np.float32)).shape == (1, CLIPS.n_mels)  # the 640th sample
    assert stream.frames_emitted == 1


# --- bad input -----------------------------------------------------------------------------------------


def test_stream_rejects_integer_samples():
    stream = LogMelStream(CLIPS)
    with pytest.raises(TypeError, match=r"int16.*float32 in \[-1, 1\]"):
        stream.push(np.zeros(100, dtype=np.int16))
    with pytest.raises(TypeError, match="float32"):
        stream.push(torch.zeros(100, dtype=torch.int32))
    with pytest.raises(TypeError, match="numpy array or torch.Tensor"):
        stream.push([0.0] * 10)
    with pytest.raises(TypeError, match=r"float32 in \[-1, 1\]"):
        LogMel(CLIPS)(torch.zeros(1000, dtype=torch.int16))


def test_stream_rejects_multichannel():
    stream = LogMelStream(CLIPS)
    with pytest.raises(ValueError, match=r"\(1000, 2\).*downmix to mono"):
        stream.push(np.zeros((1000, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="downmix to mono"):
        stream.push(np.zeros((), dtype=np.float32))
    assert stream.samples_seen == 0


def test_stream_rejects_non_finite_and_keeps_state():
    config = TINY
    y = scene(config, 0.1)
    stream = LogMelStream(config)
    first = stream.push(y[:100])
    bad = y[100:200].copy()
    bad[37] = np.nan
    expected = r"sample 37 of this chunk \(sample 137 of the stream\) is nan.*sanitise"
    with pytest.raises(ValueError, match=expected):
        stream.push(bad)
    bad[37] = 0.0
    bad[5] = -np.inf
    with pytest.raises(ValueError, match=r"sample 5 .* is -inf"):
        stream.push(torch.from_numpy(bad))
    # The refused chunks changed nothing: the stream goes on as if they had never been pushed.
    assert stream.samples_seen == 100
    rest = stream.push(y[100:])
    offline = LogMel(config)(torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(torch.cat([first, rest]).numpy(), offline, rtol=0, atol=LOG_ATOL_STREAM)

    batch = torch.zeros(2, 700)
    batch[1, 650] = float("nan")
    with pytest.raises(ValueError, match=r"sample 650 of row \(1,\) is nan.*sanitise"):
        LogMel(CLIPS)(batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stream_on_cuda_matches_cpu_offline():
    config = PAPER
    y = scene(config, 1.0)
    stream = LogMelStream(config, device="cuda")
    outs = [stream.push(y[i : i + 441]) for i in range(0, len(y), 441)]
    assert all(o.device.type == "cuda" for o in outs)
    streamed = torch.cat(outs).cpu().numpy()
    offline = LogMel(config)(torch.from_numpy(y)).numpy()
    # cuFFT and cuBLAS round differently from pocketfft and CPU BLAS: compare at the cross-
    # implementation tolerance (the one used against librosa), not the streaming one.
    np.testing.assert_allclose(streamed, offline, rtol=0, atol=LOG_ATOL_VS_LIBROSA)
