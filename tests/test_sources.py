"""Audio sources: ring buffer, streaming resampler, sanitiser, array/file/microphone sources.

Tolerances:

* streamed resampling vs ``soxr.resample`` of the whole signal (same quality): |a - b| <= 1e-6
  (float32 samples of amplitude <= 1). soxr's streaming and one-shot paths run the same filter
  on the same samples; measured: bitwise equal in every chunking tried.
* FileSource vs ``read_audio``: the same (both use soxr VHQ; the downmix is the same float32
  channel mean): |a - b| <= 1e-6, equal lengths.

The microphone test records through the real stack (PortAudio -> ALSA pulse plugin -> a private
PulseAudio server's null-sink monitor, see tests/pulse.py) while paplay plays a tone-burst
pattern; it skips, saying what to install, where pulseaudio/pulseaudio-utils/libportaudio2/
sounddevice are missing.
"""

from __future__ import annotations

import threading
import time
import types

import numpy as np
import pytest
import soundfile as sf
import soxr

from rtsed.audio import sources
from rtsed.audio.files import AudioFileError, read_audio
from rtsed.audio.sources import (
    CLIP_LEVEL,
    ArraySource,
    AudioDeviceError,
    FileSource,
    MicrophoneSource,
    SampleRing,
    Sanitizer,
    StreamingResampler,
    format_device_list,
    resolve_input_device,
)

RESAMPLE_ATOL = 1e-6


def _drain(source, timeout_s=0.1) -> np.ndarray:
    out = []
    with source:
        while (block := source.read(timeout_s)) is not None:
            assert block.dtype == np.float32 and block.ndim == 1
            out.append(block)
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# ---------------------------------------------------------------------------------------------
# SampleRing
# ---------------------------------------------------------------------------------------------


def test_ring_order_across_wraparound():
    ring = SampleRing(10, channels=2)
    seq = np.arange(200, dtype=np.float32).reshape(100, 2)
    got, pos = [], 0
    for n_write, n_read in [(7, 5), (6, 8), (9, 4), (3, 100), (10, 3), (0, 100)]:
        assert ring.write(seq[pos:pos + n_write])
        pos += n_write
        out = ring.read(n_read, timeout_s=0)
        assert out.shape[1] == 2
        got.append(out)
    np.testing.assert_array_equal(np.concatenate(got), seq[:pos])
    assert ring.dropped_blocks == 0 and ring.available() == 0


def test_ring_full_drops_newest_whole_block_and_counts():
    ring = SampleRing(10)
    assert ring.write(np.arange(8, dtype=np.float32))
    assert not ring.write(np.arange(100, 105, dtype=np.float32))  # 5 > 2 free: dropped whole
    assert (ring.dropped_blocks, ring.dropped_frames) == (1, 5)
    assert ring.write(np.array([50, 51], np.float32))  # exactly fits
    assert not ring.write(np.array([60], np.float32))
    assert (ring.dropped_blocks, ring.dropped_frames) == (2, 6)
    # What was buffered is intact (oldest kept, newest dropped).
    np.testing.assert_array_equal(ring.read(100, timeout_s=0)[:, 0], [0, 1, 2, 3, 4, 5, 6, 7, 50, 51])


def test_ring_read_timeout_and_close():
    ring = SampleRing(16)
    t0 = time.monotonic()
    out = ring.read(4, timeout_s=0.05)
    assert out.shape == (0, 1) and time.monotonic() - t0 >= 0.04
    ring.write(np.ones(3, np.float32))
    ring.close()
    assert not ring.write(np.ones(1, np.float32))  # closed: refused, counted
    assert ring.read(8, timeout_s=1.0, min_frames=8).shape == (3, 1)  # drains without waiting
    assert ring.read(8, timeout_s=1.0) is None


def test_ring_concurrent_producer_consumer_loses_nothing():
    """A producer thread and this (consumer) thread: every frame arrives, in order. The producer
    asserts nothing itself: it records what went wrong and always closes the ring, and both sides
    have deadlines, so a failure is reported here instead of hanging the consumer."""
    total, cap = 200_000, 4096
    ring = SampleRing(cap)
    signal = np.arange(total, dtype=np.float32)
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 300, size=total)  # more than enough
    errors: list[str] = []
    deadline = time.monotonic() + 60

    def produce():
        try:
            pos, i = 0, 0
            while pos < total:
                n = min(int(sizes[i]), total - pos)
                i += 1
                while ring.free() < n:  # a real device delivers at a fixed pace; wait instead of flooding
                    if time.monotonic() > deadline:
                        errors.append(f"the consumer read nothing for too long (at frame {pos})")
                        return
                    time.sleep(0.0002)
                if not ring.write(signal[pos:pos + n]):
                    errors.append(f"write of {n} frames at {pos} dropped with {ring.free()} frames free")
                    return
                pos += n
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(repr(exc))
        finally:
            ring.close()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    got = []
    while (block := ring.read(int(rng.integers(1, 2000)), timeout_s=0.01, min_frames=64)) is not None:
        got.append(block[:, 0])
        assert time.monotonic() < deadline + 5, "the producer neither wrote nor closed the ring"
    producer.join(timeout=10)
    assert not producer.is_alive() and not errors, errors
    np.testing.assert_array_equal(np.concatenate(got), signal)
    assert ring.dropped_blocks == 0 and ring.written_frames == total


# ---------------------------------------------------------------------------------------------
# StreamingResampler, Sanitizer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quality", ["HQ", "VHQ"])
@pytest.mark.parametrize("rates", [(44100, 16000), (48000, 16000), (16000, 44100), (22050, 16000)])
def test_resampler_streamed_equals_oneshot(rates, quality):
    in_rate, out_rate = rates
    rng = np.random.default_rng(1)
    x = (0.3 * rng.standard_normal(in_rate)).astype(np.float32)  # 1 s
    rs = StreamingResampler(in_rate, out_rate, quality=quality)
    out, pos = [], 0
    while pos < len(x):
        n = int(rng.integers(1, 3000))
        out.append(rs.process(x[pos:pos + n]))
        pos += n
    out.append(rs.flush())
    y = np.concatenate(out)
    ref = soxr.resample(x, in_rate, out_rate, quality=quality)
    assert y.dtype == np.float32 and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=0, atol=RESAMPLE_ATOL)
    assert 0 < rs.group_delay_s <= rs.delay_s < 0.2


def test_resampler_delay_bounds_what_it_holds_back_and_output_is_time_aligned():
    in_rate, out_rate, block = 44100, 16000, 882
    rs = StreamingResampler(in_rate, out_rate, quality="VHQ", block_frames=block)
    x = np.zeros(2 * in_rate, np.float32)
    x[in_rate] = 1.0  # an impulse at t = 1 s
    fed, out = 0, []
    for pos in range(0, len(x), block):
        out.append(rs.process(x[pos:pos + block]))
        fed += block
        held_s = fed / in_rate - sum(map(len, out)) / out_rate
        assert held_s <= rs.delay_s + 1.5 / out_rate
        if fed > in_rate // 2:
            assert held_s >= rs.group_delay_s - 1.5 / out_rate
    y = np.concatenate(out + [rs.flush()])
    # The delay is latency, not a shift: the impulse comes out at t = 1 s on the output timeline.
    assert abs(int(np.argmax(np.abs(y))) - out_rate) <= 1
    assert abs(len(y) - 2 * out_rate) <= 1


def test_resampler_passthrough():
    rs = StreamingResampler(16000, 16000)
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    assert rs.passthrough and rs.delay_s == 0.0
    np.testing.assert_array_equal(rs.process(x), x)
    assert rs.flush().shape == (0,)


def test_sanitizer_replaces_nonfinite_and_counts_clipping():
    s = Sanitizer()
    x = np.array([[0.1, np.nan], [np.inf, -np.inf], [1.0, -1.0], [CLIP_LEVEL, 0.5], [2.0, 0.0]], np.float32)
    y = s(x)
    assert y is x and np.isfinite(y).all()
    np.testing.assert_array_equal(y[:2], np.array([[0.1, 0.0], [0.0, 0.0]], np.float32))
    assert s.nonfinite == 3
    assert s.clipped == 4  # 1.0, -1.0, CLIP_LEVEL, 2.0 (int16 max 32767/32768 reaches CLIP_LEVEL)
    assert s(np.zeros((0, 2), np.float32)).size == 0


# ---------------------------------------------------------------------------------------------
# ArraySource, FileSource
# ---------------------------------------------------------------------------------------------


def _scene(rate: int, seconds: float, channels: int) -> np.ndarray:
    rng = np.random.default_rng(2)
    t = np.arange(int(rate * seconds)) / rate
    chans = [0.4 * np.sin(2 * np.pi * (300 + 500 * c) * t) + 0.05 * rng.standard_normal(len(t))
             for c in range(channels)]
    return np.stack(chans, axis=1).astype(np.float32)


def test_array_source_matches_oneshot_and_counts_bad_samples():
    x = _scene(44100, 1.0, 2)
    x[100, 0] = np.nan
    x[200, 1] = 1.5
    src = ArraySource(x, 44100, 16000, block_s=0.013)
    y = _drain(src)
    clean = x.copy()
    clean[100, 0] = 0.0
    ref = soxr.resample(clean.mean(axis=1, dtype=np.float32), 44100, 16000, quality="VHQ")
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=0, atol=RESAMPLE_ATOL)
    st = src.stats
    assert (st.nonfinite_replaced, st.clipped_samples) == (1, 1)
    assert (st.samples_in, st.samples_out, st.channels) == (44100, len(y), 2)
    assert st.end_reason == "end of stream" and st.resampler_delay_s == src.delay_s > 0


def test_array_source_int16_and_silence():
    x = np.zeros(16000, np.int16)
    src = ArraySource(x, 16000, 16000)
    y = _drain(src)
    assert y.shape == (16000,) and src.delay_s == 0.0
    assert src.stats.silence_s == pytest.approx(1.0) and src.stats.level_dbfs == sources.LEVEL_FLOOR_DBFS
    y = _drain(ArraySource(np.array([16384, -32768], np.int16), 16000, 16000))
    np.testing.assert_array_equal(y, [0.5, -1.0])


@pytest.mark.parametrize("rate,channels", [(44100, 2), (16000, 1)])
def test_file_source_matches_read_audio(tmp_path, rate, channels):
    path = tmp_path / f"scene_{rate}_{channels}.wav"
    sf.write(path, _scene(rate, 1.5, channels), rate, subtype="PCM_16")
    src = FileSource(path, 16000, block_s=0.02)
    assert (src.stats.device_rate_hz, src.stats.channels) == (rate, channels)
    y = _drain(src)
    ref = read_audio(path, 16000)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=0, atol=RESAMPLE_ATOL)
    assert src.stats.end_reason == "end of file"


def test_file_source_realtime_pacing(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, _scene(16000, 0.5, 1), 16000)
    src = FileSource(path, 16000, realtime=True, block_s=0.02)
    t0 = time.monotonic()
    y = _drain(src, timeout_s=0.05)
    elapsed = time.monotonic() - t0
    assert len(y) == 8000
    assert elapsed >= 0.8 * src.duration_s


def test_file_source_nonfinite_does_not_stop_the_stream(tmp_path):
    x = _scene(16000, 0.5, 1)
    x[1000] = np.inf
    path = tmp_path / "inf.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    src = FileSource(path, 16000)
    y = _drain(src)
    assert len(y) == len(x) and np.isfinite(y).all() and src.stats.nonfinite_replaced == 1


def test_file_source_unreadable_names_the_file(tmp_path):
    bad = tmp_path / "not_audio.wav"
    bad.write_bytes(b"this is not a RIFF file at all" * 10)
    with pytest.raises(AudioFileError, match="not_audio.wav"):
        FileSource(bad, 16000)
    with pytest.raises(AudioFileError, match="missing.flac"):
        FileSource(tmp_path / "missing.flac", 16000)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioFileError, match="empty.wav.*no samples"):
        FileSource(empty, 16000)


# ---------------------------------------------------------------------------------------------
# Device selection and errors (no PortAudio needed)
# ---------------------------------------------------------------------------------------------

DEVICES = [
    {"index": 0, "name": "HDA Intel PCH: ALC257 Analog (hw:0,0)", "hostapi": "ALSA",
     "max_input_channels": 2, "default_samplerate_hz": 44100.0, "is_default": False},
    {"index": 3, "name": "USB Audio Mic (hw:2,0)", "hostapi": "ALSA",
     "max_input_channels": 1, "default_samplerate_hz": 48000.0, "is_default": False},
    {"index": 5, "name": "default", "hostapi": "ALSA",
     "max_input_channels": 32, "default_samplerate_hz": 44100.0, "is_default": True},
]


def test_resolve_input_device():
    assert resolve_input_device(None, DEVICES)["index"] == 5
    assert resolve_input_device(3, DEVICES)["index"] == 3
    assert resolve_input_device("3", DEVICES)["index"] == 3  # --input-device N arrives as a string
    assert resolve_input_device("usb", DEVICES)["index"] == 3
    assert resolve_input_device("DEFAULT", DEVICES)["index"] == 5
    with pytest.raises(AudioDeviceError, match=r"(?s)'webcam'.*ALC257.*USB Audio Mic"):
        resolve_input_device("webcam", DEVICES)
    with pytest.raises(AudioDeviceError, match=r"(?s)'hw:'.*several.*0: .*3: "):
        resolve_input_device("hw:", DEVICES)
    with pytest.raises(AudioDeviceError, match=r"(?s)input device 7 does not exist.*default"):
        resolve_input_device(7, DEVICES)
    with pytest.raises(AudioDeviceError, match="no audio input device found"):
        resolve_input_device(None, [])
    table = format_device_list(DEVICES)
    assert "*   5  default" in table and "USB Audio Mic" in table and "48000" in table


def test_missing_sounddevice_or_portaudio_messages(monkeypatch):
    def no_module(name):
        raise ImportError(name)

    monkeypatch.setattr(sources.importlib, "import_module", no_module)
    with pytest.raises(AudioDeviceError, match=r"pip install 'rtsed\[live\]'"):
        MicrophoneSource(16000)

    def no_portaudio(name):
        raise OSError("PortAudio library not found")

    monkeypatch.setattr(sources.importlib, "import_module", no_portaudio)
    with pytest.raises(AudioDeviceError, match="apt-get install libportaudio2"):
        sources.list_input_devices()


class _FakeFlags:
    def __init__(self, overflow=False):
        self.input_overflow = overflow


class _FakeSoundDevice(types.SimpleNamespace):
    """Just enough of sounddevice to drive MicrophoneSource's callback by hand."""

    class PortAudioError(Exception):
        pass

    def __init__(self, busy=False, rates=(48000.0,)):
        super().__init__(default=types.SimpleNamespace(device=[1, -1]), busy=busy, rates=rates, streams=[])

    def query_devices(self):
        return [{"name": "Monitor", "hostapi": 0, "max_input_channels": 0, "default_samplerate": 48000.0},
                {"name": "Fake Mic", "hostapi": 0, "max_input_channels": 4, "default_samplerate": 96000.0}]

    def query_hostapis(self):
        return [{"name": "FakeAPI"}]

    def check_input_settings(self, device, channels, dtype, samplerate):
        if samplerate not in self.rates:
            raise self.PortAudioError("Invalid sample rate [PaErrorCode -9997]")

    def InputStream(self, **kw):
        if self.busy:
            raise self.PortAudioError("Error opening InputStream: Device unavailable [PaErrorCode -9985]")
        fake = self

        class Stream:
            latency = 0.02

            def __init__(self):
                self.kw = kw
                fake.streams.append(self)

            def start(self):
                pass

            def stop(self):
                kw["finished_callback"]()

            def close(self):
                pass

        return Stream()


def test_microphone_callback_only_copies_and_read_processes(monkeypatch):
    fake = _FakeSoundDevice()
    monkeypatch.setattr(sources, "_import_sounddevice", lambda: fake)
    mic = MicrophoneSource(16000, block_s=0.02, ring_s=0.1)
    # The default device offered 96 kHz x 4 ch; it refused 96 kHz, so the fallback 48 kHz is used,
    # with 2 of 4 channels.
    assert (mic.rate_hz, mic.channels) == (48000.0, 2)
    mic.start()
    (stream,) = fake.streams
    kw = stream.kw
    assert (kw["samplerate"], kw["channels"], kw["dtype"], kw["blocksize"]) == (48000.0, 2, "float32", 960)
    x = _scene(48000, 0.2, 2)  # 2 x the ring: some blocks must drop
    for i in range(0, len(x), 960):
        kw["callback"](x[i:i + 960], 960, None, _FakeFlags(overflow=(i == 0)))
    st = mic.stats
    assert st.overflows == 1 and st.dropped_blocks == 5 and st.dropped_samples == 5 * 960
    assert st.samples_in == 0  # nothing processed on the callback thread
    y = mic.read(0.1)
    mic.stop()
    assert mic.read(0.1) is not None  # the flushed resampler tail, then end of stream
    assert mic.read(0.1) is None
    st = mic.stats
    assert st.samples_in == 4800 and st.channels == 2 and st.device_rate_hz == 48000
    assert st.device_name == "Fake Mic (FakeAPI)" and st.end_reason == "stopped"
    assert y.dtype == np.float32 and 0 < len(y) <= 1600


def test_microphone_busy_device_error_names_device(monkeypatch):
    fake = _FakeSoundDevice(busy=True)
    monkeypatch.setattr(sources, "_import_sounddevice", lambda: fake)
    mic = MicrophoneSource(16000, device="fake")
    with pytest.raises(AudioDeviceError, match=r"(?s)'Fake Mic'.*Device unavailable.*busy"):
        mic.start()
    fake.rates = ()
    with pytest.raises(AudioDeviceError, match=r"(?s)'Fake Mic'.*accepts none of the sample rates"):
        MicrophoneSource(16000)


# ---------------------------------------------------------------------------------------------
# The real capture path: PortAudio -> ALSA -> PulseAudio null-sink monitor
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pulse(tmp_path_factory):
    from pulse import PulseUnavailable, pulse_server

    try:
        with pulse_server(tmp_path_factory.mktemp("pulse")) as server:
            yield server
    except PulseUnavailable as exc:
        pytest.skip(f"no PulseAudio null sink for the capture test: {exc}")


TONE_HZ = 1000.0
BURSTS_S = [(0.3, 0.8), (1.2, 1.7)]  # in a 2.0 s file


def test_microphone_records_tone_bursts_through_pulseaudio(pulse, tmp_path):
    rate = 48000
    t = np.arange(int(2.0 * rate)) / rate
    x = np.zeros_like(t)
    for a, b in BURSTS_S:
        on = (t >= a) & (t < b)
        x[on] = 0.5 * np.sin(2 * np.pi * TONE_HZ * t[on])
    path = tmp_path / "bursts.wav"
    sf.write(path, x.astype(np.float32), rate, subtype="PCM_16")

    mic = MicrophoneSource(16000)  # the default input: the null sink's monitor
    delivered = _count_callback_frames(mic)
    out = []
    with mic:
        player = pulse.play(path)
        deadline = time.monotonic() + 15
        while player.poll() is None and time.monotonic() < deadline:
            out.append(mic.read(0.05))
        end = time.monotonic() + 0.6  # the tail still in PulseAudio's and soxr's buffers
        while time.monotonic() < end:
            out.append(mic.read(0.05))
    _, err = player.communicate(timeout=5)
    assert player.returncode == 0, err
    out += _rest_of(mic)
    stats = mic.stats
    y = np.concatenate(out)
    # Whatever a busy machine made the ring drop is counted: every frame PortAudio delivered was
    # either read or dropped. (With the 10 s ring and this reader, drops would take a 10 s stall.)
    assert sum(delivered) == stats.samples_in + stats.dropped_samples
    assert stats.dropped_samples == stats.dropped_blocks * mic.block_frames
    assert stats.nonfinite_replaced == 0
    assert stats.channels >= 1 and stats.device_rate_hz > 0 and stats.samples_out == len(y)
    assert len(y) > 1.5 * 16000, f"captured only {len(y) / 16000:.2f} s: {stats}"

    # The tone is there: the spectral peak within 10 Hz of 1 kHz.
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    peak_hz = np.fft.rfftfreq(len(y), 1 / 16000)[np.argmax(spec)]
    assert abs(peak_hz - TONE_HZ) < 10, peak_hz

    # And its timing: two bursts of 0.5 s, 0.4 s apart (20 ms RMS frames, -20 dB re the loudest).
    hop = 320
    rms = np.sqrt(np.mean(y[: len(y) // hop * hop].reshape(-1, hop) ** 2, axis=1))
    loud = rms > 0.1 * rms.max()
    edges = np.flatnonzero(np.diff(np.r_[0, loud.astype(int), 0]))
    runs = edges.reshape(-1, 2) * hop / 16000
    assert len(runs) == 2, runs
    durations = runs[:, 1] - runs[:, 0]
    np.testing.assert_allclose(durations, [0.5, 0.5], atol=0.05)
    assert runs[1, 0] - runs[0, 1] == pytest.approx(0.4, abs=0.05)


def _count_callback_frames(mic: MicrophoneSource) -> list[int]:
    """The frame count of every block PortAudio hands to ``mic``'s callback (appended on
    PortAudio's thread); the callback itself runs unchanged."""
    delivered: list[int] = []
    callback = mic._callback

    def counting(indata, frames, time_info, status):
        delivered.append(frames)
        callback(indata, frames, time_info, status)

    mic._callback = counting  # _open passes self._callback to sounddevice
    return delivered


def _rest_of(mic: MicrophoneSource, timeout_s: float = 10) -> list[np.ndarray]:
    """After stop(): what the ring still holds and the resampler's tail, until end of stream."""
    out, deadline = [], time.monotonic() + timeout_s
    while (block := mic.read(0.05)) is not None:
        out.append(block)
        assert time.monotonic() < deadline, "the stopped source never reported end of stream"
    return out


def test_microphone_counts_the_blocks_a_stalled_reader_loses_through_pulseaudio(pulse, tmp_path):
    """The real capture path with a 0.1 s ring and a reader that stalls while 0.4 s of a 2 s tone
    arrives: the ring drops whole blocks, and the counters account for every frame PortAudio
    delivered (read + dropped, in whole blocks), with nothing read twice or lost uncounted."""
    rate = 48000
    t = np.arange(int(2.0 * rate)) / rate
    path = tmp_path / "tone.wav"
    sf.write(path, (0.5 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32), rate, subtype="PCM_16")
    mic = MicrophoneSource(16000, ring_s=0.1)
    delivered = _count_callback_frames(mic)
    out = []
    with mic:
        player = pulse.play(path)
        deadline = time.monotonic() + 15
        # The stall: no read while PortAudio delivers four times what the ring holds (the monitor
        # delivers nothing until the playback starts).
        while sum(delivered) < 4 * mic._ring.capacity_frames and time.monotonic() < deadline:
            time.sleep(0.01)
        while player.poll() is None and time.monotonic() < deadline:
            out.append(mic.read(0.02))
        stalled = mic.stats
    _, err = player.communicate(timeout=5)
    assert player.returncode == 0, err
    out += _rest_of(mic)
    stats = mic.stats
    assert stalled.dropped_blocks > 0, f"a 0.4 s stall on a 0.1 s ring dropped nothing: {stalled}"
    assert set(delivered) == {mic.block_frames}  # PortAudio's fixed block size
    assert stats.dropped_samples == stats.dropped_blocks * mic.block_frames
    assert sum(delivered) == stats.samples_in + stats.dropped_samples
    assert stats.samples_out == sum(len(b) for b in out)


def test_microphone_unknown_name_lists_real_devices(pulse):
    with pytest.raises(AudioDeviceError, match=r"(?s)no input device name contains 'no-such-mic-xyz'.*default"):
        MicrophoneSource(16000, device="no-such-mic-xyz")
    names = [d["name"] for d in sources.list_input_devices()]
    assert "default" in names
    assert "default" in format_device_list()
