"""The log-mel front end, offline (`LogMel`) and streaming (`LogMelStream`), with one arithmetic.

Frame t covers samples [t * hop, t * hop + window) of the stream (no centring, no padding; a
trailing partial frame is dropped), so a signal of N samples gives ``config.n_frames(N)`` frames.
Per frame::

    x: (window,) -> x * w (periodic Hamming or Hann) -> zero-pad to fft_size -> |rfft|^2 (power)
      -> mel matrix (n_mels, fft_size // 2 + 1) -> log(mel + log_offset)   (natural log)

This is ``log(librosa.feature.melspectrogram(..., center=False, power=2.0, htk=False,
norm='slaney') + log_offset)`` with the same window and FFT size. When fft_size > window, librosa
frames n_fft samples and centres the window inside them, so its frame t starts (n_fft - window) // 2
samples later than ours and it yields fewer frames; the framing above is ours (tests compare
against librosa on a signal padded by that offset).

`LogMelStream` feeds the same `LogMel.frames` as the offline path. The results are equal up to the
summation order that the FFT and the matmul choose for 1 frame vs T frames (not bitwise: measured
<= 2e-6 in log, tested at 1e-5 in tests/test_frontend.py).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from rtsed.config import FrontendConfig

__all__ = ["mel_filterbank", "LogMel", "LogMelStream"]


# --- mel filter bank (numpy, librosa-identical) -----------------------------------------------------

# Slaney's Auditory Toolbox mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above
# (27 mels per factor 6.4). The same constants as librosa (htk=False).
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_LOG_HZ = 1000.0
_SLANEY_LOG_MEL = _SLANEY_LOG_HZ / _SLANEY_HZ_PER_MEL  # 15 mels
_SLANEY_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel of frequencies in Hz (float64 array -> float64 array)."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _SLANEY_HZ_PER_MEL
    log = hz >= _SLANEY_LOG_HZ
    mel[log] = _SLANEY_LOG_MEL + np.log(hz[log] / _SLANEY_LOG_HZ) / _SLANEY_LOGSTEP
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of `_hz_to_mel` (float64 array -> float64 array, Hz)."""
    mel = np.asarray(mel, dtype=np.float64)
    hz = mel * _SLANEY_HZ_PER_MEL
    log = mel >= _SLANEY_LOG_MEL
    hz[log] = _SLANEY_LOG_HZ * np.exp(_SLANEY_LOGSTEP * (mel[log] - _SLANEY_LOG_MEL))
    return hz


def mel_filterbank(config: FrontendConfig) -> np.ndarray:
    """Triangular mel filters: (n_mels, fft_size // 2 + 1) float32, weight per rfft power bin.

    Slaney mel scale, Slaney area normalisation (each triangle scaled by 2 / its width in Hz, so a
    band's response to white noise does not grow with its width), band edges n_mels + 2 points evenly
    spaced in mel between fmin and fmax. Identical to ``librosa.filters.mel(sr=, n_fft=fft_size,
    n_mels=, fmin=, fmax=, htk=False, norm='slaney')``: same float64 arithmetic and the same two
    roundings to float32 (triangle, then triangle * norm), so the tests can ask for ~1 ulp. Written
    here in numpy so that librosa stays a test-only dependency.
    """
    n_bins = config.fft_size // 2 + 1
    fft_hz = np.fft.rfftfreq(n=config.fft_size, d=1.0 / config.sample_rate_hz)  # (n_bins,)
    mel_edges = np.linspace(
        _hz_to_mel(np.array([config.fmin_hz]))[0], _hz_to_mel(np.array([config.fmax]))[0], config.n_mels + 2
    )
    edges_hz = _mel_to_hz(mel_edges)  # (n_mels + 2,) lower edge, centre, upper edge of every band
    width_hz = np.diff(edges_hz)  # (n_mels + 1,)
    ramps = edges_hz[:, None] - fft_hz[None, :]  # (n_mels + 2, n_bins): edge minus bin, Hz

    weights = np.zeros((config.n_mels, n_bins), dtype=np.float32)
    for m in range(config.n_mels):
        rising = -ramps[m] / width_hz[m]  # 0 at the lower edge, 1 at the centre
        falling = ramps[m + 2] / width_hz[m + 1]  # 1 at the centre, 0 at the upper edge
        weights[m] = np.maximum(0.0, np.minimum(rising, falling))
    # In place on the float32 array, as librosa does: float64 product, one rounding to float32.
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]

    # A band narrower than the FFT bin spacing catches no bin and always outputs log(log_offset).
    empty = (mel_edges[:-2] != 0) & (weights.max(axis=1) <= 0)
    if empty.any():
        warnings.warn(
            f"mel_filterbank: mel band(s) {np.flatnonzero(empty).tolist()} catch no FFT bin "
            f"(bin spacing {config.sample_rate_hz / config.fft_size:.1f} Hz); use fewer n_mels, a "
            "larger n_fft, or a higher fmin_hz",
            stacklevel=2,
        )
    return weights


# --- offline log-mel ---------------------------------------------------------------------------------


def _window(config: FrontendConfig) -> Tensor:
    """(window_samples,) float32 periodic window: scipy.signal.get_window(name, n, fftbins=True)."""
    make = {"hamming": torch.hamming_window, "hann": torch.hann_window}[config.window]
    return make(config.window_samples, periodic=True, dtype=torch.float64).to(torch.float32)


def _check_float(samples: Tensor | np.ndarray, where: str) -> None:
    dtype = samples.dtype
    if isinstance(dtype, torch.dtype):
        is_float = dtype.is_floating_point
    else:
        is_float = np.issubdtype(dtype, np.floating)
    if not is_float:
        raise TypeError(
            f"{where}: samples have dtype {dtype}, expected floating point audio; convert to float32 "
            "in [-1, 1] first (e.g. int16: x.astype(np.float32) / 32768)"
        )


def _raise_non_finite(samples: Tensor, where: str, stream_offset: int | None = None) -> None:
    """Raise a ValueError naming the first NaN/Inf sample (call only once a check has failed)."""
    bad = torch.nonzero(~torch.isfinite(samples))[0].tolist()
    value = samples[tuple(bad)].item()
    at = f"sample {bad[-1]}" + (f" of row {tuple(bad[:-1])}" if samples.dim() > 1 else "")
    if stream_offset is not None:
        at += f" of this chunk (sample {stream_offset + bad[-1]} of the stream)"
    raise ValueError(
        f"{where}: {at} is {value}, not finite; audio sources must sanitise their samples "
        "(replace NaN/Inf, e.g. np.nan_to_num) before the front end"
    )


class LogMel(torch.nn.Module):
    """Offline log-mel: samples (..., N) float -> (..., T, n_mels) float32, T = config.n_frames(N).

    Inputs shorter than one window give T = 0. The window and the mel matrix are non-persistent
    buffers: ``.to(device)`` moves them, and a state dict does not carry them (the config rebuilds
    them exactly, so a checkpoint stays small and never disagrees with its own config).
    """

    window: Tensor
    mel_basis: Tensor

    def __init__(self, config: FrontendConfig):
        super().__init__()
        self.config = config
        self.register_buffer("window", _window(config), persistent=False)  # (window_samples,)
        mel = torch.from_numpy(mel_filterbank(config))  # (n_mels, n_bins)
        # Stored as (n_bins, n_mels) so that power (..., T, n_bins) @ mel_basis needs no transpose.
        self.register_buffer("mel_basis", mel.t().contiguous(), persistent=False)

    def frames(self, framed: Tensor) -> Tensor:
        """framed: (..., T, window_samples) float32 samples, one frame per row -> (..., T, n_mels) float32.

        The single arithmetic of the front end, shared by `forward` and `LogMelStream.push`.
        """
        # rfft(n=fft_size) zero-pads at the end while librosa centres the window inside n_fft. The
        # two inputs differ by a circular shift, which multiplies each bin by a unit phase factor:
        # the power |X|^2 is the same, and padding at the end needs no extra copy.
        spectrum = torch.fft.rfft(framed * self.window, n=self.config.fft_size)  # (..., T, n_bins)
        # re^2 + im^2 rather than abs()^2: no sqrt to round and no second rounding of the square.
        power = spectrum.real.square() + spectrum.imag.square()
        return torch.log(power @ self.mel_basis + self.config.log_offset)

    def forward(self, samples: Tensor) -> Tensor:
        """samples: (..., N) float tensor -> (..., T, n_mels) float32 log-mel, T = config.n_frames(N)."""
        if not isinstance(samples, Tensor):
            raise TypeError(
                f"LogMel: expected a torch.Tensor of samples (..., N), got {type(samples).__name__}; "
                "wrap numpy arrays with torch.from_numpy"
            )
        _check_float(samples, "LogMel")
        if samples.dim() == 0:
            raise ValueError("LogMel: samples must have a time axis (..., N), got a scalar")
        samples = samples.to(torch.float32)
        # One reduction and one sync per call: negligible next to the FFTs, and a NaN here would
        # otherwise surface much later as NaN scores.
        if not bool(torch.isfinite(samples).all()):
            _raise_non_finite(samples, "LogMel")
        cfg = self.config
        n_frames = cfg.n_frames(samples.shape[-1])
        if n_frames == 0:  # unfold refuses a dimension shorter than the window
            return samples.new_zeros((*samples.shape[:-1], 0, cfg.n_mels))
        # unfold is a view (no copy): (..., N) -> (..., T, window), row t starting at t * hop.
        return self.frames(samples.unfold(-1, cfg.window_samples, cfg.hop_samples))


# --- streaming log-mel -------------------------------------------------------------------------------


class LogMelStream:
    """Streaming log-mel for one mono stream: push chunks of any size, get the frames completed so far.

    Concatenating every `push` result gives ``LogMel(config)`` of the concatenated samples.

    Pending samples live in a preallocated *compacting linear* buffer of window - 1 + hop samples,
    not a ring buffer: framing needs each window contiguous (``unfold`` is then a free view), which a
    ring buffer would break at the wrap point and force a copy anyway. Compaction moves at most
    window - 1 samples and happens only when a frame was emitted, i.e. at most once per hop of new
    samples: about window / hop (2) sample copies per new sample, far below the frame's FFT. It
    copies into a second buffer of the same size and swaps the two, because an in-place move of
    overlapping memory is not allowed in torch. A chunk that does not fit (more than hop new samples
    on top of a nearly full window) is framed from one concatenation of pending + new samples instead;
    the usual audio block (<= one hop) never allocates a sample buffer.

    A push is a handful of small torch ops. Stream on one intra-op thread
    (``torch.set_num_threads(1)``, the engine's choice, not this class's): with two threads on a
    busy machine a few-frame FFT can wait milliseconds for its helper thread.
    """

    def __init__(self, config: FrontendConfig, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self._logmel = LogMel(config).to(self.device)
        self._capacity = config.window_samples - 1 + config.hop_samples
        self._buffer = torch.zeros(self._capacity, dtype=torch.float32, device=self.device)
        self._spare = torch.zeros_like(self._buffer)  # compaction target, swapped with _buffer
        self._empty = torch.zeros((0, config.n_mels), dtype=torch.float32, device=self.device)
        self.reset()

    def reset(self) -> None:
        """Forget pending samples; the next push starts a new stream at t = 0 (buffers reused)."""
        self._pending = 0  # samples in _buffer: stream samples [next frame start, samples_seen)
        self._skip = 0  # samples still to drop before the next frame starts (only when hop > window)
        self._frames_emitted = 0
        self._samples_seen = 0

    @property
    def frames_emitted(self) -> int:
        """Frames returned since the last reset."""
        return self._frames_emitted

    @property
    def samples_seen(self) -> int:
        """Samples pushed since the last reset (pending ones included)."""
        return self._samples_seen

    def frames_after(self, n_samples: int) -> int:
        """How many frames ``push`` of n_samples more samples would return now (no state change)."""
        return self.config.n_frames(self._pending + max(n_samples - self._skip, 0))

    def _as_tensor(self, samples: Tensor | np.ndarray) -> Tensor:
        """Validate one chunk; return it as a (n,) float32 tensor on self.device. Changes no state."""
        if not isinstance(samples, (np.ndarray, Tensor)):
            raise TypeError(
                f"LogMelStream.push: expected a numpy array or torch.Tensor of shape (n,), got "
                f"{type(samples).__name__}"
            )
        _check_float(samples, "LogMelStream.push")
        if samples.ndim != 1:
            raise ValueError(
                f"LogMelStream.push: expected mono samples of shape (n,), got shape {tuple(samples.shape)}; "
                "downmix to mono first (e.g. x.mean(axis=1) for (n, channels) audio)"
            )
        if isinstance(samples, np.ndarray):
            # float32 (and native byte order) on the CPU side: half the bytes to move to a GPU.
            chunk = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
        else:
            chunk = samples.detach()
        # The one check on the hot path, made before any state changes (a bad chunk is refused whole)
        # and where the samples are, so a numpy chunk costs no device sync.
        if not bool(torch.isfinite(chunk).all()):
            _raise_non_finite(chunk, "LogMelStream.push", stream_offset=self._samples_seen)
        return chunk.to(device=self.device, dtype=torch.float32)

    def push(self, samples: Tensor | np.ndarray) -> Tensor:
        """samples: (n,) float32/float64 numpy array or tensor -> (k, n_mels) float32 on `device`, k >= 0.

        k is the number of frames this chunk completes. Work is O(n) plus the k frames.
        """
        chunk = self._as_tensor(samples)
        self._samples_seen += chunk.shape[0]
        if self._skip:  # hop > window: the samples between two frames belong to none
            dropped = min(self._skip, chunk.shape[0])
            chunk, self._skip = chunk[dropped:], self._skip - dropped
        n_new = chunk.shape[0]
        if n_new == 0:
            return self._empty

        cfg = self.config
        total = self._pending + n_new
        n_frames = cfg.n_frames(total)
        if total <= self._capacity:
            self._buffer[self._pending : total].copy_(chunk)
            pending = self._buffer[:total]
        else:  # total > capacity >= window, so n_frames >= 1 below
            pending = torch.cat((self._buffer[: self._pending], chunk))
        if n_frames == 0:
            self._pending = total
            return self._empty

        out = self._logmel.frames(pending.unfold(0, cfg.window_samples, cfg.hop_samples))
        # Keep what the next frame needs: stream samples from the start of frame n_frames onwards.
        consumed = n_frames * cfg.hop_samples
        keep = max(total - consumed, 0)  # <= window - 1 by definition of n_frames
        if keep:
            self._spare[:keep].copy_(pending[consumed:])
            self._buffer, self._spare = self._spare, self._buffer
        self._pending = keep
        self._skip = max(consumed - total, 0)
        self._frames_emitted += n_frames
        return out
