"""What the gateway, the workers and the NATS server agree on: subjects, message headers, the
server's partition mapping, and the JetStream stream and key-value buckets.

Subjects (a stream is named ``<gateway>.<n>``: the gateway's id and its stream counter)::

    rtsed.in.<gateway>.<n>          audio, as the gateway publishes it
    rtsed.audio.<K>.<gateway>.<n>   the same message after the server's mapping: K = partition,
                                    {{partition(N,1,2)}} of the two stream tokens (the server
                                    hashes, never our code); JetStream keeps it ``retention_s``
    rtsed.events.<gateway>.<n>      JSON from the owning worker: onset, event, progress (how far
                                    it has decoded, with each resume point), end

An audio message is a block of mono samples at the model's rate (16 kHz for the bundled
detectors), little-endian float32 or int16, with headers: ``Rtsed-Seq`` (0, 1, ...),
``Rtsed-Sample`` (index of its first sample in the stream), ``Rtsed-T-S`` (the same in stream
seconds), ``Rtsed-Rate``, ``Rtsed-Format``, ``Rtsed-Name``, ``Rtsed-Thresholds`` (the client's
decoder overrides, JSON, when it gave some) and ``Rtsed-End: 1`` on the stream's last block.
Every block carries what a worker needs to take the stream over from its retained audio alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

IN_PREFIX = "rtsed.in"
AUDIO_PREFIX = "rtsed.audio"
EVENTS_PREFIX = "rtsed.events"
AUDIO_STREAM = "RTSED_AUDIO"  # the JetStream stream that retains every partition's audio
LEASE_BUCKET = "rtsed_leases"  # key p<K>of<N> -> the worker that owns partition K (TTL: the lease)
RESUME_BUCKET = "rtsed_resume"  # key <gateway>.<n> -> where a stream's decoding stands (see worker)
RESUME_TTL_S = 600.0  # resume points of streams gone quiet are forgotten after this long

FORMATS = {"f32le": "<f4", "s16le": "<i2"}
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_token(value: str, what: str) -> str:
    """A subject token of ours: letters, digits, ``_`` and ``-`` (no ``.``, ``*``, ``>``)."""
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r}: use 1-64 letters, digits, '_' or '-' (it is a NATS subject token)")
    return value


def audio_in_subject(stream: str) -> str:
    return f"{IN_PREFIX}.{stream}"


def events_subject(stream: str) -> str:
    return f"{EVENTS_PREFIX}.{stream}"


def partition_filter(partition: int) -> str:
    """The subjects of one partition's audio, after the server's mapping."""
    return f"{AUDIO_PREFIX}.{partition}.*.*"


def stream_of(subject: str) -> str:
    """``rtsed.audio.K.gw.n`` or ``rtsed.events.gw.n`` -> ``gw.n``."""
    return ".".join(subject.split(".")[-2:])


def server_mapping(partitions: int) -> tuple[str, str]:
    """(source, destination) of the server's subject mapping that partitions the audio."""
    return (f"{IN_PREFIX}.*.*",
            f"{AUDIO_PREFIX}.{{{{partition({partitions},1,2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}")


def server_config(partitions: int, port: int = 4222, store_dir: str = "/var/lib/nats", host: str = "0.0.0.0") -> str:
    """A nats-server configuration with JetStream and the partition mapping (docs/cluster.md)."""
    source, destination = server_mapping(partitions)
    return (f"listen: {host}:{port}\n"
            f"jetstream {{\n  store_dir: \"{store_dir}\"\n}}\n"
            f"mappings = {{\n  \"{source}\": \"{destination}\"\n}}\n")


@dataclass(frozen=True)
class Partition:
    """Partition ``index`` of ``count`` (``--partition K/N``)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Partition":
        try:
            k, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise ValueError(f"--partition {text!r}: write K/N, e.g. 0/2 (partition 0 of 2)") from None
        if not (n >= 1 and 0 <= k < n):
            raise ValueError(f"--partition {text!r}: K must lie in 0..N-1 and N >= 1")
        return cls(k, n)

    @property
    def lease_key(self) -> str:
        return f"p{self.index}of{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


# ------------------------------------------------------------------------------ audio blocks
@dataclass(frozen=True)
class AudioBlock:
    """One audio message: ``samples`` (n,) float32 from sample ``first_sample`` of ``stream``."""

    stream: str
    seq: int
    first_sample: int
    rate_hz: int
    samples: np.ndarray
    name: str = ""
    thresholds: dict | None = None
    end: bool = False


def encode_block(block: AudioBlock, sample_format: str = "f32le") -> tuple[bytes, dict[str, str]]:
    """(payload, headers) of a block."""
    if sample_format == "s16le":
        payload = (np.clip(block.samples, -1.0, 32767 / 32768) * 32768).round().astype("<i2").tobytes()
    elif sample_format == "f32le":
        payload = block.samples.astype("<f4").tobytes()
    else:
        raise ValueError(f"sample format {sample_format!r}: use f32le or s16le")
    headers = {"Rtsed-Seq": str(block.seq), "Rtsed-Sample": str(block.first_sample),
               "Rtsed-T-S": f"{block.first_sample / block.rate_hz:.6f}", "Rtsed-Rate": str(block.rate_hz),
               "Rtsed-Format": sample_format, "Rtsed-Name": block.name,
               # JetStream drops a block published twice (a gateway's retry) within its window.
               "Nats-Msg-Id": f"{block.stream}.{block.seq}"}
    if block.thresholds:
        headers["Rtsed-Thresholds"] = json.dumps(block.thresholds)
    if block.end:
        headers["Rtsed-End"] = "1"
    return payload, headers


def decode_block(subject: str, payload: bytes, headers: dict[str, str] | None) -> AudioBlock:
    """An audio message back into a block (ValueError naming what is wrong)."""
    h = headers or {}
    try:
        sample_format = h["Rtsed-Format"]
        dtype = FORMATS[sample_format]
        samples = np.frombuffer(payload, dtype=dtype)
        samples = samples.astype(np.float32) / 32768 if sample_format == "s16le" else samples.astype(np.float32)
        thresholds = json.loads(h["Rtsed-Thresholds"]) if h.get("Rtsed-Thresholds") else None
        return AudioBlock(stream_of(subject), int(h["Rtsed-Seq"]), int(h["Rtsed-Sample"]), int(h["Rtsed-Rate"]),
                          samples, h.get("Rtsed-Name", ""), thresholds, h.get("Rtsed-End") == "1")
    except (KeyError, ValueError) as exc:
        raise ValueError(f"audio message on {subject}: bad or missing header ({exc!r}); an rtsed gateway "
                         "(python -m rtsed.serve --nats) publishes these") from None


# ------------------------------------------------------------------------------ JetStream
async def ensure_audio_stream(js, retention_s: float, update: bool = False):
    """The JetStream stream that retains every partition's audio for ``retention_s`` (oldest
    dropped first). ``update``: set the retention when the stream exists with another one."""
    from nats.js import api
    from nats.js.errors import NotFoundError

    try:
        info = await js.stream_info(AUDIO_STREAM)
    except NotFoundError:
        return await js.add_stream(name=AUDIO_STREAM, subjects=[f"{AUDIO_PREFIX}.*.*.*"], max_age=retention_s,
                                   storage=api.StorageType.FILE, discard=api.DiscardPolicy.OLD,
                                   duplicate_window=min(60.0, retention_s))
    if update and abs((info.config.max_age or 0) - retention_s) > 1e-3:
        config = info.config
        config.max_age = retention_s
        config.duplicate_window = min(60.0, retention_s)
        return await js.update_stream(config)
    return info


async def key_value(js, bucket: str, ttl_s: float):
    """A key-value bucket (created with ``ttl_s`` when missing)."""
    from nats.js.errors import BucketNotFoundError, NotFoundError

    try:
        return await js.key_value(bucket)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_key_value(bucket=bucket, ttl=ttl_s, history=1)
