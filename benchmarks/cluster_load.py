"""Streams through NATS workers against the in-process server, on loopback.

    python -m benchmarks.cluster_load --streams 4 8 16 --workers 1 2 --seconds 20

For each stream count N it runs, one after another: a plain ``rtsed.serve`` (the in-process
baseline), then ``rtsed.serve --nats`` with a nats-server and 1, then 2, ``rtsed.worker``
processes (partitions 0/W .. W-1/W). N WebSocket clients each send a different procedural scene
(tests/serve_helpers.make_scene, seeds 0..N-1) in real time in 20 ms blocks; every stream's
events are compared with ``rtsed.detect``'s on its scene.

Reported per run:
- **sustained**: every stream got rtsed.detect's events (labels, onsets within a hop) and no audio
  was dropped;
- **notice latency** (median / p95 over all onset notices): the wall time a client received the
  notice minus the wall time it sent the audio at the event's onset. It includes the detector's
  algorithmic latency (window, lookahead, decoder), the same in every mode, so the difference
  between a NATS run and the in-process run is what NATS and the extra processes cost;
- **end latency**: from a client's end message to its stream's close (last events out).

The numbers depend on the machine and on what else runs on it: say which, and how loaded it was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

RATE = 16000
CHUNK_S = 0.02


async def _client(ws_url: str, audio, name: str) -> dict:
    import websockets

    sent_at: list[float] = []  # wall time each chunk was sent
    out = {"notices": [], "events": [], "end_latency_s": None, "dropped_s": 0.0}
    chunk = int(CHUNK_S * RATE)
    async with websockets.connect(ws_url, max_size=None, open_timeout=60, ping_interval=None) as ws:
        await ws.send(json.dumps({"sample_rate": RATE, "channels": 1, "format": "f32le", "name": name}))
        ended_at = None

        async def send():
            nonlocal ended_at
            start = time.monotonic()
            for i in range(0, audio.shape[0], chunk):
                await ws.send(audio[i:i + chunk].tobytes())
                sent_at.append(time.monotonic())
                delay = start + (i // chunk + 1) * CHUNK_S - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            ended_at = time.monotonic()
            await ws.send(json.dumps({"type": "end"}))

        sender = asyncio.create_task(send())
        try:
            async for text in ws:
                m = json.loads(text)
                now = time.monotonic()
                if m["type"] == "onset":
                    k = min(int(m["onset_s"] / CHUNK_S), len(sent_at) - 1)
                    out["notices"].append(now - sent_at[k])
                elif m["type"] == "event":
                    out["events"].append((m["label"], m["onset_s"], m["offset_s"]))
                elif m["type"] == "end":
                    out["dropped_s"] = m.get("dropped_audio_s", 0.0)
                    if ended_at is not None:
                        out["end_latency_s"] = now - ended_at
        except websockets.ConnectionClosed:
            pass
        await asyncio.gather(sender, return_exceptions=True)
    out["events"].sort()
    return out


def _run_clients(ws_url: str, scenes: list) -> list[dict]:
    async def main():
        return await asyncio.gather(*[_client(ws_url, audio, f"mic{i}") for i, (audio, _) in enumerate(scenes)])

    return asyncio.run(main())


def _summary(mode: str, results: list[dict], scenes: list) -> dict:
    from serve_helpers import assert_same_events

    matched = 0
    for out, (_, expected) in zip(results, scenes):
        try:
            assert_same_events(out["events"], expected)
            matched += 1
        except AssertionError:
            pass
    notices = sorted(x for out in results for x in out["notices"])
    ends = [out["end_latency_s"] for out in results if out["end_latency_s"] is not None]
    dropped = sum(out["dropped_s"] for out in results)
    return {"mode": mode, "streams": len(results), "matched": matched, "dropped_s": round(dropped, 3),
            "sustained": matched == len(results) and dropped == 0,
            "notice_median_s": round(statistics.median(notices), 3) if notices else None,
            "notice_p95_s": round(notices[int(0.95 * (len(notices) - 1))], 3) if notices else None,
            "end_median_s": round(statistics.median(ends), 3) if ends else None}


def run(streams: int, workers: list[int], seconds: float, folder: Path, report=print) -> None:
    import soundfile as sf

    from cluster_helpers import WorkerProcess, start_nats
    from serve_helpers import ServerProcess, detect_events, make_scene

    scenes = []
    for i in range(streams):
        audio = make_scene(seconds, seed=i)
        path = folder / f"scene{i}.wav"
        sf.write(path, audio, RATE, subtype="FLOAT")
        scenes.append((audio, detect_events(path)))
    server = ServerProcess("--max-streams", str(streams), log_path=folder / "inproc.log")
    try:
        report(_summary("in-process", _run_clients(server.ws_url, scenes), scenes))
    finally:
        server.stop()
    for n in workers:
        run_dir = folder / f"nats{n}"
        run_dir.mkdir()
        nats = start_nats(run_dir, n)
        procs, gateway = [], None
        try:
            procs = [WorkerProcess(nats.url, [f"{k}/{n}"], f"w{k}", run_dir / f"w{k}.log", "--max-streams",
                                   str(streams)) for k in range(n)]
            for k, w in enumerate(procs):
                w.wait_for(f"owns partition {k}/{n}", timeout_s=600)
            gateway = ServerProcess("--nats", nats.url, "--max-streams", str(streams), log_path=run_dir / "gw.log")
            report(_summary(f"nats, {n} worker(s)", _run_clients(gateway.ws_url, scenes), scenes))
        finally:
            if gateway is not None:
                gateway.stop()
            for w in procs:
                w.stop()
            nats.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, nargs="+", default=[4])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seconds", type=float, default=10.0, help="scene length (the events lie in its first 8 s)")
    args = p.parse_args(argv)
    print("| mode | streams | sustained | events match | dropped s | notice latency median / p95 s | end s |")
    print("|---|---|---|---|---|---|---|")

    def row(r: dict) -> None:
        print(f"| {r['mode']} | {r['streams']} | {'yes' if r['sustained'] else 'no'} | "
              f"{r['matched']}/{r['streams']} | {r['dropped_s']} | {r['notice_median_s']} / "
              f"{r['notice_p95_s']} | {r['end_median_s']} |", flush=True)

    for n in args.streams:
        with tempfile.TemporaryDirectory() as tmp:
            run(n, args.workers, args.seconds, Path(tmp), row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
