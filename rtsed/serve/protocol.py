"""The streaming protocol of ``rtsed.serve``: what a client says and what it is told.

One WebSocket per stream (``/ws``):

1. client -> server, text: the header, a JSON object::

       {"sample_rate": 48000, "channels": 2, "format": "f32le",
        "thresholds": {"dog": 0.6, "rain": [0.5, 0.3]}, "name": "kitchen"}

   ``sample_rate`` (Hz, 1000-384000), ``channels`` (1-32) and ``format`` (``SAMPLE_FORMATS``)
   are required; ``thresholds`` (per-class decoder overrides, ``on`` or ``[on, off]``) and
   ``name`` (shown on the grid page) are optional.
2. client -> server, binary: interleaved samples in that format, messages of any size (a sample
   frame may be split across messages). Text ``{"type": "end"}`` ends the stream: its open
   events are closed and sent, then the server closes the socket (1000).
3. server -> client, text JSON, one object per message, by ``type``:
   ``ready`` (the model, labels, thresholds, hop, latency), ``onset`` and ``event`` (the JSONL
   forms of ``rtsed.live``: label, onset_s, [offset_s, score]; times in stream seconds from the
   stream's first sample), ``frames`` (for displays, about every ``display_interval_s`` of
   stream time: per-frame class probabilities, raw log-mel frames quantised to 0-255, input
   level), ``warning``, ``error`` (sent before a close that has a problem to name), ``end``.

Close codes: 1000 the stream ended (client's end, no audio for the idle timeout); 1001 the
server is shutting down (events closed and sent first); 1003 binary before the header; 1007 a
malformed header; 1008 a policy was broken (flood faster than real time, a client that does not
read, no header in time); 1011 an internal error; 1013 the server is full, or too far behind to
send an ended stream's last events within the shutdown and send timeouts.

Watching (``/watch/{id}``, the page's ``/?watch=ID``): a read-only WebSocket gets the stream's
``ready`` message (with ``"watching": true`` and its ``source``) and then what its client gets
from that moment on, up to ``end`` (then 1000); 4404 when no live stream has that id.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

# name -> (numpy dtype, scale to [-1, 1))
SAMPLE_FORMATS: dict[str, tuple[str, float]] = {
    "f32le": ("<f4", 1.0),
    "s16le": ("<i2", 1.0 / 32768),
    "s32le": ("<i4", 1.0 / 2147483648),
}
MIN_RATE_HZ, MAX_RATE_HZ = 1000, 384000
MAX_CHANNELS = 32
HEADER_EXAMPLE = '{"sample_rate": 48000, "channels": 1, "format": "f32le"}'

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_BAD_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013
CLOSE_NO_STREAM = 4404  # /watch/{id}: no live stream with that id (an application code, 4000-4999)
MAX_REASON_BYTES = 123  # RFC 6455: a close frame's reason fits in 125 bytes with its code


class ProtocolError(Exception):
    """A client's mistake: a close code and a message that names the problem and the fix."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def close_reason(message: str) -> str:
    """``message`` cut to what a close frame carries (UTF-8 bytes, whole characters); the whole
    message goes in an ``error`` message before the close."""
    data = message.encode("utf-8")
    if len(data) <= MAX_REASON_BYTES:
        return message
    return data[:MAX_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


@dataclass(frozen=True)
class StreamHeader:
    """A stream's declaration: its audio's rate (Hz), channel count and sample format, per-class
    decoder overrides and a display name."""

    sample_rate_hz: int
    channels: int
    sample_format: str
    thresholds: dict = field(default_factory=dict)
    name: str = ""

    @property
    def bytes_per_frame(self) -> int:
        """Bytes of one sample frame (one sample of every channel)."""
        return np.dtype(SAMPLE_FORMATS[self.sample_format][0]).itemsize * self.channels

    @property
    def bytes_per_second(self) -> int:
        return self.bytes_per_frame * self.sample_rate_hz


def _bad(message: str) -> ProtocolError:
    return ProtocolError(CLOSE_BAD_DATA, f"header: {message}")


def parse_header(text: str, labels: tuple[str, ...]) -> StreamHeader:
    """The first message's text -> StreamHeader; ProtocolError naming the field and the fix."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(f"not JSON ({exc.msg} at char {exc.pos}); send e.g. {HEADER_EXAMPLE}") from None
    if not isinstance(data, dict):
        raise _bad(f"expected a JSON object, got {type(data).__name__}; send e.g. {HEADER_EXAMPLE}")
    missing = [k for k in ("sample_rate", "channels", "format") if k not in data]
    if missing:
        raise _bad(f"missing {', '.join(missing)}; send e.g. {HEADER_EXAMPLE}")
    known = {"sample_rate", "channels", "format", "thresholds", "name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise _bad(f"unknown field(s) {unknown}; the fields are {sorted(known)}")
    rate = data["sample_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate != int(rate) \
            or not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
        raise _bad(f"sample_rate {rate!r}: give an integer rate in Hz, {MIN_RATE_HZ}-{MAX_RATE_HZ}")
    channels = data["channels"]
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
        raise _bad(f"channels {channels!r}: give an integer 1-{MAX_CHANNELS}")
    fmt = data["format"]
    if fmt not in SAMPLE_FORMATS:
        raise ProtocolError(CLOSE_BAD_DATA, f"header: format {fmt!r} is not supported; use one of "
                                            f"{', '.join(SAMPLE_FORMATS)} (little-endian, interleaved)")
    thresholds = data.get("thresholds") or {}
    if not isinstance(thresholds, dict):
        raise _bad('thresholds: give an object {"label": on} or {"label": [on, off]}')
    overrides: dict = {}
    for label, value in thresholds.items():
        if label not in labels:
            raise _bad(f"thresholds: unknown label {label!r}; the model's labels are {list(labels)}")
        pair = value if isinstance(value, list) else [value]
        if not 1 <= len(pair) <= 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              and 0 < v < 1 for v in pair):
            raise _bad(f"thresholds[{label!r}] = {value!r}: give on, or [on, off], each in (0, 1)")
        if len(pair) == 2 and pair[1] > pair[0]:
            raise _bad(f"thresholds[{label!r}]: off {pair[1]} exceeds on {pair[0]}")
        overrides[label] = float(pair[0]) if len(pair) == 1 else (float(pair[0]), float(pair[1]))
    name = data.get("name", "")
    if not isinstance(name, str) or len(name) > 100:
        raise _bad("name: give a string of at most 100 characters")
    return StreamHeader(int(rate), channels, fmt, overrides, name)


class SampleDecoder:
    """Binary messages in the header's format -> float32 sample frames (n, channels).

    A message may end inside a sample frame: the remainder is carried to the next message, so a
    client may cut its byte stream anywhere."""

    def __init__(self, header: StreamHeader):
        self.dtype = np.dtype(SAMPLE_FORMATS[header.sample_format][0])
        self.scale = SAMPLE_FORMATS[header.sample_format][1]
        self.channels = header.channels
        self.frame_bytes = header.bytes_per_frame
        self._carry = b""

    def decode(self, data: bytes) -> np.ndarray:
        if self._carry:
            data = self._carry + data
        whole = len(data) - len(data) % self.frame_bytes
        self._carry = data[whole:]
        x = np.frombuffer(data, dtype=self.dtype, count=whole // self.dtype.itemsize).astype(np.float32)
        if self.scale != 1.0:
            x *= np.float32(self.scale)
        return x.reshape(-1, self.channels)


def dumps(message: dict) -> str:
    """A server message as compact JSON (no NaN: probabilities and levels are finite)."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False)
