"""``InputWatchdog``: an alarm once no sample has arrived for timeout_s of wall time, cleared when
samples come again; silence (zeros still arriving) is not an alarm. The end-to-end case, a real
PulseAudio server frozen under ``rtsed.live``, is in tests/test_live.py."""

import pytest

from rtsed.audio.watchdog import InputWatchdog


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_alarm_after_timeout_without_samples_once_then_resumed():
    clock = Clock()
    dog = InputWatchdog(2.0, "mic", clock=clock)
    samples = 0
    for _ in range(12):  # 3 s of 0.25 s blocks arriving (binary-exact steps): no alarm
        clock.now += 0.25
        samples += 4000
        assert dog.feed(samples) is None
    messages = []
    for _ in range(16):  # 4 s of empty reads (the count stands still)
        clock.now += 0.25
        messages.append(dog.feed(samples))
    said = [m for m in messages if m]
    assert len(said) == 1 and said[0].startswith("no audio from mic for 2 s") and "Ctrl-C" in said[0]
    assert messages.index(said[0]) == 7  # at 2.0 s after the last sample, not before
    assert dog.alarm and dog.stalls == 1 and dog.status().startswith("no audio from mic for 4 s")
    clock.now += 0.25
    resumed = dog.feed(samples + 4000)
    assert resumed == "audio from mic resumed after 4.2 s without any"
    assert not dog.alarm and dog.status() is None and dog.stalls == 1


def test_session_start_counts_as_audio_and_bad_timeouts_are_refused():
    clock = Clock()
    dog = InputWatchdog(1.0, clock=clock)
    clock.now += 0.9
    assert dog.feed(0) is None  # a device still opening is not overdue yet
    clock.now += 0.1
    assert "no audio from the audio input for 1 s" in dog.feed(0)
    with pytest.raises(ValueError, match="--watchdog-s must be > 0"):
        InputWatchdog(0)
