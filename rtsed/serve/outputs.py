"""Detections out of the server: what every event output (MQTT, webhook) is told, and the JSON
it sends for an onset or a finished event.

The batching worker calls an output on its own thread, between model steps, so an output's
methods must return at once: each output queues what it is given (bounded, drops counted) and
does its network work on a thread of its own. A broker or endpoint that is down, slow or gone
costs that output's messages, never a step, an event sent to a client, or the event loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rtsed.serve.decode import OnsetNotice, SoundEvent, event_to_json


@dataclass(frozen=True)
class StreamRef:
    """A stream as outputs name it: the server's stream id, a topic-safe ``slug`` (lower-case
    letters, digits, ``_`` and ``-``; from the client's name, else ``stream<id>``) and the name
    shown to people."""

    id: int
    slug: str
    name: str


_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def slugify(name: str, fallback: str) -> str:
    """``"Kitchen / Mic 2"`` -> ``"kitchen_mic_2"``: safe in an MQTT topic level (no ``/``, ``+``,
    ``#``) and in a Home Assistant object id; ``fallback`` when nothing is left."""
    slug = _UNSAFE.sub("_", name.strip().lower()).strip("_")[:64]
    return slug or fallback


def item_payload(stream: StreamRef, item: OnsetNotice | SoundEvent) -> dict:
    """The JSON an output sends: the ``rtsed.live --jsonl`` form of the onset or event (times in
    stream seconds from the stream's first sample) plus which stream it came from."""
    return {**event_to_json(item), "stream": stream.slug, "stream_id": stream.id, "name": stream.name}


class EventOutput:
    """The interface of an output. Every method runs on the worker thread and must not block."""

    def stream_started(self, stream: StreamRef) -> None:
        """A stream joined the engine (its first audio may follow at once)."""

    def emit(self, stream: StreamRef, item: OnsetNotice | SoundEvent) -> None:
        """An onset notice or a finished event of ``stream``, in the order the decoder made them."""

    def stream_ended(self, stream: StreamRef) -> None:
        """The stream completed: its open events were closed and emitted before this call."""

    def close(self, timeout_s: float) -> None:
        """Server shutdown (after every stream ended): send what is queued, for at most
        ``timeout_s``, then stop the output's thread."""
