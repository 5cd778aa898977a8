"""Noticing that audio stopped arriving: a frozen audio server, an unplugged device, a stalled file.

A source that stops delivering samples does not fail: its reads just come back empty, so a
session would sit there silently. ``InputWatchdog`` is fed the source's running count of samples
received after every read and raises an alarm once no new sample has arrived for ``timeout_s``
of wall time, and clears it when samples come again. Silence is not the same thing: a muted
microphone still delivers (zero) samples, which the source's level and ``silence_s`` report.
"""

from __future__ import annotations

import time
from typing import Callable


class InputWatchdog:
    """Wall-clock watchdog over a source's received-sample count.

    ``feed(samples_in)`` after each read (``samples_in``: frames received so far, the source's
    ``stats.samples_in``) returns a one-line message when the state changes (audio stopped /
    audio resumed), else None. ``alarm`` says whether audio is overdue now, ``silent_for_s`` for
    how long nothing has arrived, ``stalls`` how many times the alarm went off.
    """

    def __init__(self, timeout_s: float, source_name: str = "the audio input",
                 clock: Callable[[], float] = time.monotonic):
        if not timeout_s > 0:
            raise ValueError(f"--watchdog-s must be > 0 seconds, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.source_name = source_name
        self._clock = clock
        self._last_count = 0
        self._last_audio = clock()  # the session start counts as audio: the device needs time to open
        self.alarm = False
        self.stalls = 0

    @property
    def silent_for_s(self) -> float:
        """Wall seconds since the last new sample (or since the watchdog started)."""
        return self._clock() - self._last_audio

    def feed(self, samples_in: int) -> str | None:
        now = self._clock()
        if samples_in > self._last_count:
            self._last_count = samples_in
            gap = now - self._last_audio
            self._last_audio = now
            if self.alarm:
                self.alarm = False
                return f"audio from {self.source_name} resumed after {gap:.1f} s without any"
            return None
        if not self.alarm and now - self._last_audio >= self.timeout_s:
            self.alarm = True
            self.stalls += 1
            return (f"no audio from {self.source_name} for {self.timeout_s:g} s: the audio server or device may "
                    "have stopped or been unplugged; check it (Ctrl-C ends the session and writes every output)")
        return None

    def status(self) -> str | None:
        """The view's warning line while the alarm is on, else None."""
        if not self.alarm:
            return None
        return f"no audio from {self.source_name} for {self.silent_for_s:.0f} s: is the audio server or device stopped?"
