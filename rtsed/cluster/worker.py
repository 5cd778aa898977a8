"""A worker: owns one partition of the streams and runs all of them through one MultiStreamEngine.

Ownership is a lease in a JetStream key-value bucket (key ``p<K>of<N>``, the bucket's TTL is the
lease): the worker that creates the key owns the partition and renews it every quarter lease;
others listed for that partition stand by, retrying the create, and the first one to succeed after
the owner's lease lapses (a SIGKILLed worker renews nothing) takes the partition over.

The owner reads its partition's audio through an ordered consumer from the oldest retained block,
so a worker that takes over starts from what JetStream still holds (``--retention-s``). Where to
resume each stream comes from its **resume point**, which the owner writes to the ``rtsed_resume``
bucket every ``checkpoint_s`` of stream time, after the events it covers were published: the
decoder's whole state after frame F (``EventDecoder.snapshot``). The next owner starts the stream's
front end and model afresh at frame S = F - P, where P is the model's past context (the frames
before an output frame that it depends on; 36 for dnd_7_10, whose receptive field spans 73 frames,
1.5 s with the window), computes but does not decode frames S..F-1 (they refill the model's
state), and hands frames from F on to the restored decoder. Each output frame from F on depends
only on log-mel frames from S on, and log-mel frame S starts at sample S * hop, so the events equal
those of one uninterrupted run. Events between the resume point and the old owner's death are
decided again, identically; the gateway drops the repeats by (kind, label, onset frame).

Retention must cover the resume point's age (up to ``checkpoint_s`` plus the lookahead and a step
behind the head), P frames, and the time a takeover takes (a lease plus a start-up), with room for
a backlog: 10 s by default for dnd_7_10 (a 3 s lease).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from dataclasses import dataclass, field

import numpy as np

from rtsed.cluster.subjects import (LEASE_BUCKET, RESUME_BUCKET, RESUME_TTL_S, AudioBlock, Partition, decode_block,
                                    ensure_audio_stream, events_subject, key_value, partition_filter)
from rtsed.serve.decode import EventDecoder, OnsetNotice, SoundEvent, event_to_json
from rtsed.serve.engine import MultiStreamEngine

log = logging.getLogger("rtsed.worker")

# Steps per round before the worker publishes and takes new audio: a backlog does not keep the
# events already decided from going out.
STEPS_PER_ROUND = 32


def past_context_frames(model) -> int:
    """Input frames before an output frame that the model reads (its receptive field's past): the
    left context of every CNN block and of the temporal part. ValueError for a recurrent model,
    whose past is unbounded: no amount of retained audio re-primes it exactly."""
    temporal = model.temporal
    if getattr(temporal, "skips_warmup", False) or not hasattr(temporal, "context_frames"):
        raise ValueError(f"{model.name}: its temporal part is recurrent (or does not say its context), so its "
                         "receptive field is unbounded and a worker cannot re-prime it from retained audio; "
                         "serve it with python -m rtsed.serve (one process), or use a convolutional model (dnd_*)")
    cnn = sum(b.context_frames - b.right_pad for b in model.blocks)
    return cnn + temporal.context_frames - temporal.right_pad


@dataclass
class WorkerStream:
    """A stream this worker runs: its engine slot and where its audio stands."""

    key: str  # <gateway>.<n>
    slot: int
    next_sample: int  # index of the next sample the engine is fed
    name: str = ""
    thresholds: dict | None = None
    checkpoint_frame: int = 0  # decoder frames covered by the last resume point written
    ending: bool = False
    events: int = 0
    missing_samples: int = 0  # audio JetStream no longer held when needed, fed as silence
    ops: list = field(default_factory=list)


class PartitionWorker:
    """``run()`` until ``stop()``: acquire a partition, run its streams, give it up on stop.

    stepper/config: the model (``make_stepper``); past_frames: ``past_context_frames`` of it.
    partitions: the partitions this worker may own, first free one wins (one at a time).
    """

    def __init__(self, stepper, config, past_frames: int, nats_url: str, partitions: list[Partition],
                 worker_id: str, frames_per_step: int = 4, retention_s: float = 10.0, lease_s: float = 3.0,
                 checkpoint_s: float = 0.5, metrics=None):
        if not partitions:
            raise ValueError("give at least one --partition K/N")
        if len({p.count for p in partitions}) != 1:
            raise ValueError(f"--partition {[str(p) for p in partitions]}: every partition must be of the same N "
                             "(the N of the server's mapping)")
        self.engine = MultiStreamEngine(stepper, config, frames_per_step)
        self.config = config
        self.hop_samples = config.frontend.hop_samples
        self.rate_hz = config.frontend.sample_rate_hz
        self.past_frames = past_frames
        self.nats_url = nats_url
        self.partitions = partitions
        self.worker_id = worker_id
        self.retention_s = retention_s
        self.lease_s = lease_s
        self.checkpoint_frames = max(1, round(checkpoint_s / config.frontend.hop_s))
        self.metrics = metrics  # rtsed.cluster.telemetry.WorkerMetrics, or None
        self.streams: dict[str, WorkerStream] = {}
        self.owner: list[WorkerStream | None] = [None] * self.engine.n
        self.finished: set[str] = set()  # streams ended (here or by a previous owner)
        self.owned: Partition | None = None
        self._ops: list[tuple] = []  # engine work queued by the event loop, run on the engine thread
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._lease_lost = asyncio.Event()

    def stop(self) -> None:
        """Give the partition up (a standby takes it at once) and return from ``run``."""
        self._stopping.set()
        self._wake.set()

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        import nats

        self.nc = await nats.connect(self.nats_url, name=f"rtsed-worker-{self.worker_id}",
                                     max_reconnect_attempts=-1, connect_timeout=5)
        self.js = self.nc.jetstream()
        await ensure_audio_stream(self.js, self.retention_s, update=True)
        self.leases = await key_value(self.js, LEASE_BUCKET, self.lease_s)
        status = await self.leases.status()
        if status.ttl and abs(status.ttl - self.lease_s) > 1e-3:
            log.warning("the lease bucket's TTL is %.3g s (--lease-s %.3g s ignored): it was created so", status.ttl,
                        self.lease_s)
            self.lease_s = status.ttl
        self.resume = await key_value(self.js, RESUME_BUCKET, RESUME_TTL_S)
        try:
            while not self._stopping.is_set():
                acquired = await self._acquire()
                if acquired is None:
                    break
                await self._own(*acquired)
        finally:
            try:
                await asyncio.wait_for(self.nc.drain(), 5.0)
            except Exception:
                await self.nc.close()

    async def _acquire(self) -> tuple[Partition, int] | None:
        from nats.js.errors import KeyWrongLastSequenceError

        announced = False
        while not self._stopping.is_set():
            for p in self.partitions:
                try:
                    revision = await self.leases.create(p.lease_key, self.worker_id.encode())
                    return p, revision
                except KeyWrongLastSequenceError:
                    pass
            if not announced:
                log.info("worker %s standing by for partition(s) %s", self.worker_id,
                         ", ".join(str(p) for p in self.partitions))
                announced = True
            try:
                await asyncio.wait_for(self._stopping.wait(), min(0.25, self.lease_s / 4))
            except asyncio.TimeoutError:
                pass
        return None

    async def _own(self, partition: Partition, revision: int) -> None:
        self.owned = partition
        self._lease_lost.clear()
        log.info("worker %s owns partition %s", self.worker_id, partition)
        lease = asyncio.create_task(self._keep_lease(partition, revision))
        sub = await self.js.subscribe(partition_filter(partition.index), ordered_consumer=True, cb=self._on_audio)
        stepping = asyncio.create_task(self._step_loop())
        stop = asyncio.create_task(self._stopping.wait())
        lost = asyncio.create_task(self._lease_lost.wait())
        await asyncio.wait({stop, lost, stepping}, return_when=asyncio.FIRST_COMPLETED)
        await sub.unsubscribe()
        for task in (stop, lost):
            task.cancel()
        if stepping.done() and stepping.exception():
            lease.cancel()
            raise stepping.exception()
        self._wake.set()
        await stepping  # the last round's events and resume points go out
        lease.cancel()
        if self._stopping.is_set() and not self._lease_lost.is_set():
            await self._write_resume_points(list(self.streams.values()))
            try:  # hand the partition over now rather than after the lease runs out
                await self.leases.delete(partition.lease_key)
            except Exception:
                log.exception("could not release partition %s; a standby takes it when the lease lapses", partition)
        for st in list(self.streams.values()):
            self.engine.reset(st.slot)
            self.owner[st.slot] = None
        self.streams.clear()
        self._ops.clear()
        self.owned = None
        log.info("worker %s gave up partition %s", self.worker_id, partition)

    async def _keep_lease(self, partition: Partition, revision: int) -> None:
        from nats.js.errors import KeyWrongLastSequenceError

        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            await asyncio.sleep(self.lease_s / 4)
            try:
                revision = await self.leases.update(partition.lease_key, self.worker_id.encode(), last=revision)
                renewed = loop.time()
            except KeyWrongLastSequenceError:
                log.error("worker %s lost partition %s: its lease lapsed and another worker took it", self.worker_id,
                          partition)
                self._lease_lost.set()
                return
            except Exception as exc:  # NATS unreachable for a moment: keep trying while the lease lasts
                if loop.time() - renewed > self.lease_s:
                    log.error("worker %s could not renew its lease on partition %s for %.1f s (%s): giving it up",
                              self.worker_id, partition, self.lease_s, exc)
                    self._lease_lost.set()
                    return

    # ------------------------------------------------------------------ audio in (event loop)
    async def _on_audio(self, msg) -> None:
        try:
            block = decode_block(msg.subject, msg.data, msg.headers)
        except ValueError as exc:
            log.warning("%s", exc)
            return
        if block.rate_hz != self.rate_hz:
            log.error("stream %s: audio at %d Hz, the model runs at %d Hz; the gateway must serve the same model",
                      block.stream, block.rate_hz, self.rate_hz)
            return
        st = self.streams.get(block.stream)
        if st is None:
            if block.stream in self.finished:
                return
            st = await self._open(block)
            if st is None:
                return
        if st.ending:
            return
        self._feed(st, block)
        self._wake.set()

    async def _open(self, block: AudioBlock) -> WorkerStream | None:
        """A stream this worker has not run yet: from its resume point, or from its start."""
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.resume.get(block.stream)
            point = json.loads(entry.value)
        except KeyNotFoundError:
            point = None
        if point is not None and point.get("ended"):
            self.finished.add(block.stream)
            return None
        free = [i for i in range(self.engine.n) if self.owner[i] is None]
        if not free:
            message = (f"worker {self.worker_id} is full ({self.engine.n} streams, --max-streams): stream "
                       f"{block.stream} is not detected; run more workers or partitions, or raise --max-streams")
            log.error("%s", message)
            await self.nc.publish(events_subject(block.stream), json.dumps(
                {"type": "error", "message": message, "worker": self.worker_id}).encode())
            self.finished.add(block.stream)
            return None
        decoder_frame = point["frame"] if point else 0
        start_frame = max(0, decoder_frame - self.past_frames)
        if block.first_sample > start_frame * self.hop_samples:
            # JetStream no longer holds the audio the resume needs: start where it does, on a hop.
            retained = -(-block.first_sample // self.hop_samples)
            log.warning("stream %s: retained audio starts at %.2f s but resuming at %.2f s needs it from %.2f s; "
                        "events near %.2f s may differ from an uninterrupted run (raise --retention-s)",
                        block.stream, block.first_sample / self.rate_hz, decoder_frame * self.config.frontend.hop_s,
                        start_frame * self.hop_samples / self.rate_hz, decoder_frame * self.config.frontend.hop_s)
            start_frame = retained
        decoder = EventDecoder(self.config.labels, self.config.frontend.hop_s, self.config.decoder,
                               block.thresholds or None)
        state = point["decoder"] if point else None
        if state is None and start_frame > 0:  # no resume point: decode from the first frame we can
            decoder.push(np.zeros((0, len(self.config.labels))), first_frame=start_frame + self.past_frames)
            state = decoder.snapshot()
        elif state is not None and state["next"] < start_frame + self.past_frames and start_frame > 0:
            # frames between the resume point and the retained audio are lost: the decoder skips them
            state = {**state, "next": start_frame + self.past_frames}
        skip = (state["next"] if state is not None else 0) - start_frame
        slot = free[0]
        st = WorkerStream(block.stream, slot, start_frame * self.hop_samples, block.name, block.thresholds,
                          checkpoint_frame=decoder_frame)
        self.owner[slot] = st
        self.streams[st.key] = st
        self._ops.append(("start", st, state, max(0, skip)))
        if point is None and start_frame == 0:
            log.info("stream %s started", st.key)
        else:
            log.info("stream %s resumed at %.2f s: audio from %.2f s, %d frames re-primed", st.key,
                     decoder_frame * self.config.frontend.hop_s, start_frame * self.hop_samples / self.rate_hz,
                     max(0, skip))
        return st

    def _feed(self, st: WorkerStream, block: AudioBlock) -> None:
        """Queue the part of a block the stream has not had (blocks before its resume point are
        skipped, a block across it is cut); a hole in the audio is fed as silence."""
        samples = block.samples
        end = block.first_sample + samples.shape[0]
        if end > st.next_sample:
            if block.first_sample > st.next_sample:
                missing = block.first_sample - st.next_sample
                log.warning("stream %s: %.3f s of audio missing before %.2f s, fed as silence", st.key,
                            missing / self.rate_hz, block.first_sample / self.rate_hz)
                st.missing_samples += missing
                samples = np.concatenate([np.zeros(missing, np.float32), samples])
            else:
                samples = samples[st.next_sample - block.first_sample:]
            st.next_sample = end
            if samples.size:
                self._ops.append(("audio", st, samples))
        if block.end:
            st.ending = True
            self._ops.append(("end", st))

    # ------------------------------------------------------------------ the engine (its own thread)
    async def _step_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), 0.05)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            ops, self._ops = self._ops, []
            if ops or self.engine.ready():
                results, points = await asyncio.to_thread(self._round, ops)
                await self._publish(results, points)
            if self._stopping.is_set() or self._lease_lost.is_set():
                return

    def _round(self, ops: list[tuple]) -> tuple[list, list]:
        """Queued starts, audio and ends into the engine, then the steps they allow ->
        ([(stream, items, ended)], [(stream, decoder snapshot)])."""
        engine = self.engine
        for op in ops:
            st = op[1]
            if self.owner[st.slot] is not st:
                continue
            if op[0] == "start":
                engine.start(st.slot, st.thresholds or None, decoder_state=op[2], skip_frames=op[3])
            elif op[0] == "audio":
                engine.push_audio(st.slot, op[2])
            else:
                engine.end(st.slot)
        results, points = [], []
        for _ in range(STEPS_PER_ROUND):
            if not engine.ready():
                break
            run = engine.runnable()
            started = time.perf_counter()
            out = engine.step()
            if self.metrics is not None:
                self.metrics.step_seconds.observe(time.perf_counter() - started)
                self.metrics.steps.inc()
            for slot in np.flatnonzero(run):
                st = self.owner[slot]
                if st is None:
                    continue
                items = out.get(int(slot), [])
                ended = not engine.active[slot]
                st.events += sum(isinstance(i, SoundEvent) for i in items)
                results.append((st, items, ended))
                if ended:
                    self.owner[slot] = None
                    continue
                frames = engine.decoders[slot].next_frame
                if frames - st.checkpoint_frame >= self.checkpoint_frames and not engine.skip_frames[slot]:
                    st.checkpoint_frame = frames
                    points.append((st, engine.decoders[slot].snapshot()))
        if self.metrics is not None:
            owned = [i for i, st in enumerate(self.owner) if st is not None]
            self.metrics.streams.set(len(owned))
            self.metrics.queued_audio.set(float(engine.queued[owned].sum()) * self.config.frontend.hop_s)
        return results, points

    async def _publish(self, results: list, points: list) -> None:
        """Events first, then the resume points that cover them (one connection keeps the order)."""
        ended = set()
        for st, items, done in results:
            subject = events_subject(st.key)
            for item in items:
                payload = event_to_json(item)
                if isinstance(item, OnsetNotice):
                    payload["score"] = round(item.score, 6)
                payload["worker"] = self.worker_id
                await self.nc.publish(subject, json.dumps(payload).encode())
            if done:
                ended.add(st.key)
                await self.nc.publish(subject, json.dumps({"type": "end", "worker": self.worker_id, "events": st.events,
                                                           "missing_audio_s": st.missing_samples / self.rate_hz}
                                                          ).encode())
                self.streams.pop(st.key, None)
                self.finished.add(st.key)
                log.info("stream %s ended: %d events", st.key, st.events)
        for st, state in points:
            if st.key not in ended:  # a sign of life for the gateway, which waits on it at a stream's end
                await self.nc.publish(events_subject(st.key), json.dumps(
                    {"type": "progress", "t_s": round(state["next"] * self.config.frontend.hop_s, 6),
                     "worker": self.worker_id}).encode())
        puts = [self.resume.put(st.key, json.dumps({"frame": state["next"], "decoder": state}).encode())
                for st, state in points if st.key not in ended]
        puts += [self.resume.put(key, b'{"ended": true}') for key in ended]
        if puts:
            await asyncio.gather(*puts)

    async def _write_resume_points(self, streams: list[WorkerStream]) -> None:
        """Every running stream's resume point as it stands (a clean hand-over re-decides nothing)."""
        puts = []
        for st in streams:
            if self.owner[st.slot] is st and not self.engine.skip_frames[st.slot]:
                state = self.engine.decoders[st.slot].snapshot()
                if state["origin"] is not None:
                    puts.append(self.resume.put(st.key, json.dumps({"frame": state["next"], "decoder": state}).encode()))
        if puts:
            await asyncio.gather(*puts, return_exceptions=True)


def run_worker(worker: PartitionWorker) -> None:
    """Run until SIGINT/SIGTERM (which hand the partition over cleanly)."""

    async def main():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    asyncio.run(main())


def receptive_field_s(past_frames: int, lookahead_frames: int, config) -> float:
    """Seconds of audio one output frame depends on: past and future frames, itself, the window."""
    fe = config.frontend
    return (past_frames + lookahead_frames) * fe.hop_s + fe.window_s


