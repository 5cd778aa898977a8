"""Load on ``python -m rtsed.serve``: how many real-time WebSocket streams one server sustains,
its memory per stream, and a soak that checks flat memory and that no event is lost.

    python -m benchmarks.serve_load --backend torch --backend onnx --scenes SCENES_DIR
    python -m benchmarks.serve_load --backend onnx --scenes SCENES_DIR --soak 600 --streams 40
    python -m benchmarks.serve_load --backend torch --streams 4 --trial-s 20      # one quick trial

Each trial starts ``python -m rtsed.serve`` as a subprocess on loopback and opens N WebSocket
clients, each sending a different scene (16 kHz mono s16le by default) in real time, in 20 ms
messages, from ``--client-procs`` asyncio processes (the clients parse only the messages they
need and report how late their sends ran: a trial whose clients fell behind says so instead of
blaming the server). Scenes: every audio file under ``--scenes`` (real recordings, e.g. the test
scenes of ``python -m train.synth``), or procedural ones (tests/serve_helpers.make_scene with other
seeds) without it; stream i plays scene i mod K, rotated by a different offset for each lap, so no
two streams send the same audio.

A trial **sustains** N streams when, from the server's /metrics and /streams:
- no audio was dropped (``rtsed_dropped_audio_seconds`` and ``rtsed_queue_dropped_audio_seconds``
  stay 0);
- step latency is under the hop: the 99th percentile of ``rtsed_step_seconds`` after the warm-up
  is at most 20 ms (the histogram's bucket bound);
- the worker keeps up: after the warm-up no stream has more than ``--max-backlog-s`` of audio
  waiting (sampled every second);
- every stream ended with its ``end`` message.

The capacity search doubles N from ``--start`` until a trial fails, then bisects. Memory per
stream is the slope of the server's resident set (VmRSS) against N over the trials' steady
states. Each trial also records the end-to-end latency its clients saw (median/p95/p99, from
sending the 20 ms block that holds an onset's, or an event's last, sample to receiving the onset
notice, or the event) and the CPU the server kept busy between the warm-up and the end of the
audio (cores, from /proc). A trial runs against ``InProcess`` (this server) or any deployment
with its interface (benchmarks.cluster_load: a gateway, NATS and workers). ``--soak S`` runs one trial of S seconds at ``--streams`` N, samples the RSS every 5 s
(flat: growth after the first minute within max(5 MB, 1 %)), and compares each stream's events
with single-stream ``rtsed.detect`` (same backend) on exactly the audio it sent: labels one to
one, onsets within one hop.

Output: one JSON document (``--json``, stdout by default) and one summary line per backend.
A loaded machine (another job on the cores) lowers every figure: the load average is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BLOCK_S = 0.02  # one message per hop, as the web page sends
HOP_S = 0.02
STEP_LATENCY_LIMIT_S = 0.02
LAP_OFFSET_S = 7.3  # each lap over the scene list starts the scenes this much further in


# ------------------------------------------------------------------------------ scenes
def load_scenes(folder: str | None, rate_hz: int, seconds: float) -> list[np.ndarray]:
    """The base scenes as float32 (n,) at ``rate_hz``: every audio file under ``folder`` (mono,
    resampled), or eight procedural scenes of ``seconds`` when no folder is given."""
    import soxr

    if folder:
        import soundfile as sf

        from rtsed.audio.files import audio_files_under

        paths = audio_files_under(Path(folder))
        if not paths:
            raise SystemExit(f"--scenes {folder}: no audio files there; give a folder of WAV/FLAC scenes "
                             "(e.g. the test/audio folder that python -m train.synth writes)")
        scenes = []
        for p in paths:
            x, rate = sf.read(p, dtype="float32", always_2d=True)
            x = x.mean(axis=1)
            scenes.append(x if rate == rate_hz else soxr.resample(x, rate, rate_hz, quality="VHQ").astype(np.float32))
        return scenes
    sys.path.insert(0, str(REPO / "tests"))
    from serve_helpers import make_scene

    scenes = []
    for seed in range(8):
        # The scene's events at other places and levels: rotated by seed-dependent offsets.
        x = make_scene(seconds=max(8.0, min(seconds, 30.0)), rate=16000, seed=seed)
        x = np.roll(x, int(seed * 1.37 * 16000)) * (0.6 + 0.1 * seed)
        scenes.append(x if rate_hz == 16000 else soxr.resample(x, 16000, rate_hz, quality="VHQ").astype(np.float32))
    return scenes


def stream_audio(scenes: list[np.ndarray], index: int, seconds: float, rate_hz: int) -> np.ndarray:
    """Stream ``index``'s audio, float32 (round(seconds * rate_hz),): its scene, rotated by its
    lap's offset and tiled to the length."""
    base = scenes[index % len(scenes)]
    lap = index // len(scenes)
    x = np.roll(base, -int(lap * LAP_OFFSET_S * rate_hz) % base.size)
    n = int(round(seconds * rate_hz))
    return np.tile(x, -(-n // x.size))[:n]


def to_s16le(x: np.ndarray) -> bytes:
    return np.clip(np.rint(x * 32768), -32768, 32767).astype("<i2").tobytes()


# ------------------------------------------------------------------------------ clients
async def _client(ws_url: str, index: int, payload: bytes, rate_hz: int, start_at: float, result: dict,
                  timeout_s: float) -> None:
    import websockets

    block = int(round(BLOCK_S * rate_hz)) * 2
    header = {"sample_rate": rate_hz, "channels": 1, "format": "s16le", "name": f"load{index}"}
    result.update(index=index, events=[], end=None, close_code=None, max_late_s=0.0, late_blocks=0, error=None,
                  onset_latency_s=[], event_latency_s=[])
    sent_at: list[float] = []  # monotonic time block k went out: the audio of [k, k + 1) * BLOCK_S
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    try:
        async with websockets.connect(ws_url, max_size=None, open_timeout=60, ping_interval=None) as ws:
            await ws.send(json.dumps(header))

            async def send():
                t0 = time.monotonic()
                for k, at in enumerate(range(0, len(payload), block)):
                    due = t0 + k * BLOCK_S
                    now = time.monotonic()
                    if due > now:
                        await asyncio.sleep(due - now)
                    else:
                        late = now - due
                        result["max_late_s"] = max(result["max_late_s"], late)
                        result["late_blocks"] += late > 0.1
                    await ws.send(payload[at:at + block])
                    sent_at.append(time.monotonic())
                await ws.send('{"type": "end"}')

            def since_sent(t_s: float) -> float:
                """Wall time from the sending of the block that holds stream time ``t_s`` to now."""
                k = min(max(0, int(t_s / BLOCK_S + 1e-9)), len(sent_at) - 1)
                return round(time.monotonic() - sent_at[k], 4)

            async def receive():
                async for text in ws:
                    if text.startswith('{"type":"frames"'):
                        continue  # the display rows: not needed here, and the costliest to parse
                    m = json.loads(text)
                    if m["type"] == "event":
                        result["events"].append((m["label"], m["onset_s"], m["offset_s"]))
                        # Its last sample lies just before offset_s.
                        result["event_latency_s"].append(since_sent(max(0.0, m["offset_s"] - 1e-4)))
                    elif m["type"] == "onset":
                        result["onset_latency_s"].append(since_sent(m["onset_s"]))
                    elif m["type"] == "end":
                        result["end"] = m

            sender = asyncio.create_task(send())
            try:
                await asyncio.wait_for(receive(), timeout_s)
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            result["close_code"] = ws.close_code
    except Exception as exc:  # reported per stream; the trial fails on it
        result["error"] = f"{type(exc).__name__}: {exc}"


def run_clients(ws_url: str, indices: list[int], scene_args: tuple, seconds: float, rate_hz: int,
                start_at_wall: float, spread_s: float) -> list[dict]:
    """One client process: streams ``indices``, each starting at its own moment within
    ``spread_s`` of ``start_at_wall`` (time.time()), so messages do not all fall on one instant."""
    scenes = load_scenes(*scene_args)
    payloads = {i: to_s16le(stream_audio(scenes, i, seconds, rate_hz)) for i in indices}
    results = {i: {} for i in indices}

    async def main():
        base = time.monotonic() + (start_at_wall - time.time())
        n = max(1, len(indices))
        await asyncio.gather(*(_client(ws_url, i, payloads[i], rate_hz, base + spread_s * k / n, results[i],
                                       timeout_s=seconds + 120.0) for k, i in enumerate(indices)))

    asyncio.run(main())
    return [results[i] for i in indices]


# ------------------------------------------------------------------------------ the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m rtsed.serve`` as a user starts it, on a free loopback port."""

    def __init__(self, model: str, backend: str, max_streams: int, extra: list[str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rtsed.serve", "--model", model, "--backend", backend, "--port", str(self.port),
             "--max-streams", str(max_streams), "--log-level", "warning", *extra],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rtsed.serve exited with {self.proc.returncode}: "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            try:
                if self.get("/health")["status"] == "ok":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("rtsed.serve did not come up in 300 s")
            time.sleep(0.2)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            body = r.read().decode()
        return body if path == "/metrics" else json.loads(body)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def read_metrics(text: str) -> dict:
    """The counters a trial needs from /metrics: {name: value}, histogram buckets as
    {"rtsed_step_seconds_bucket": {le: count}}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {"rtsed_step_seconds_bucket": {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "rtsed_step_seconds_bucket":
                out[s.name][float(s.labels["le"])] = s.value
            elif not s.labels:
                out[s.name] = s.value
    return out


def step_latency(before: dict, after: dict) -> dict:
    """Steps between two /metrics readings: count, mean and the 99th percentile's bucket bound (s)."""
    b0, b1 = before["rtsed_step_seconds_bucket"], after["rtsed_step_seconds_bucket"]
    count = after["rtsed_step_seconds_count"] - before["rtsed_step_seconds_count"]
    total = after["rtsed_step_seconds_sum"] - before["rtsed_step_seconds_sum"]
    p99 = None
    for le in sorted(b1):
        if count and b1[le] - b0.get(le, 0.0) >= 0.99 * count:
            p99 = le
            break
    return {"steps": int(count), "mean_s": total / count if count else None, "p99_bound_s": p99}


# ------------------------------------------------------------------------------ processes
def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


class InProcess:
    """The deployment a trial measures: one ``rtsed.serve`` that runs the model itself.

    The interface ``trial`` uses (benchmarks.cluster_load has the NATS one): ``url`` (the front
    door), ``get``, ``processes()`` {role: pid}, ``step_metrics()`` (the /metrics texts of the
    processes that step the model), ``counters()`` (cumulative extra counters, e.g. bytes), ``stop()``.
    """

    def __init__(self, args, backend: str, n: int, folder: Path):
        self.server = Server(args.model, backend, n, shlex.split(args.server_args), folder / "server.log")
        self.url = self.server.url
        self.get = self.server.get

    def processes(self) -> dict[str, int]:
        return {"server": self.server.proc.pid}

    def step_metrics(self) -> list[str]:
        return [self.server.get("/metrics")]

    def counters(self) -> dict[str, float]:
        return {}

    def stop(self) -> None:
        self.server.stop()


def latency_summary(values: list[float]) -> dict:
    """Count, median, p95 and p99 (s) of latencies."""
    if not values:
        return {"count": 0, "median_s": None, "p95_s": None, "p99_s": None}
    q = np.quantile(np.asarray(values), [0.5, 0.95, 0.99])
    return {"count": len(values), "median_s": round(float(q[0]), 4), "p95_s": round(float(q[1]), 4),
            "p99_s": round(float(q[2]), 4)}


def worst_step_latency(before: list[dict], after: list[dict]) -> dict | None:
    """The step latency of the process that steps slowest (highest p99 bound, then mean), from
    two readings of each stepping process's /metrics."""
    worst = None
    for b, a in zip(before, after):
        lat = step_latency(b, a)
        if lat["p99_bound_s"] is None:
            return lat  # a process that did not step at all: the trial cannot pass the rule
        if worst is None or (lat["p99_bound_s"], lat["mean_s"]) > (worst["p99_bound_s"], worst["mean_s"]):
            worst = lat
    return worst


# ------------------------------------------------------------------------------ one trial
def trial(args, backend: str, n: int, seconds: float, check_events: bool, rss_every_s: float = 1.0,
          deploy=InProcess) -> dict:
    """N streams of ``seconds`` through a fresh deployment (``deploy(args, backend, n, folder)``,
    the in-process server by default) -> the trial's record (see the module doc)."""
    rate = args.rate
    scene_args = (args.scenes, rate, seconds)
    with tempfile.TemporaryDirectory() as tmp:
        target = deploy(args, backend, n, Path(tmp))
        try:
            pids = target.processes()
            idle_rss = {role: round(process_rss_mb(pid), 1) for role, pid in pids.items()}
            procs = max(1, min(args.client_procs, n))
            groups = [list(range(n))[k::procs] for k in range(procs)]
            spread = min(1.0, BLOCK_S * n)
            start_at = time.time() + 2.0 + 0.05 * n  # time for the client processes to start
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(procs) as pool:
                pending = [pool.apply_async(run_clients, (target.url.replace("http", "ws") + "/ws", g, scene_args,
                                                          seconds, rate, start_at, spread)) for g in groups]
                samples = []  # (t since start, {role: rss MB}, queued s per stream max, engine queued per stream)
                warm = last = None  # (wall, [metrics of each stepping process], {role: cpu s}, counters)
                t_start = start_at + spread
                while not all(p.ready() for p in pending):
                    time.sleep(rss_every_s)
                    t = time.time() - t_start
                    try:
                        listing = target.get("/streams")["streams"]
                        stepping = [read_metrics(text) for text in target.step_metrics()]
                        point = (time.monotonic(), stepping, {r: process_cpu_s(p) for r, p in pids.items()},
                                 target.counters())
                    except OSError:
                        continue
                    worst = max((s["queued_s"] for s in listing), default=0.0)
                    engine_queued = max((m.get("rtsed_queued_audio_seconds", 0.0) / max(1.0, m.get("rtsed_streams", 0.0))
                                         for m in stepping), default=0.0)
                    samples.append((round(t, 2), {r: round(process_rss_mb(p), 2) for r, p in pids.items()}, worst,
                                    round(engine_queued, 4)))
                    if warm is None and t >= args.warmup_s:
                        warm = point
                    if t < seconds - 1.0:
                        last = point
                results = [r for p in pending for r in p.get()]
            final = read_metrics(target.get("/metrics"))
        finally:
            target.stop()
    results.sort(key=lambda r: r["index"])
    steady = [s for s in samples if args.warmup_s <= s[0] <= seconds - 1.0]
    window = warm is not None and last is not None and last is not warm
    steady_rss = {role: round(float(np.median([s[1][role] for s in steady])), 1) for role in pids} if steady else None
    record = {
        "backend": backend, "streams": n, "seconds": seconds, "rate_hz": rate,
        "dropped_audio_s": final.get("rtsed_dropped_audio_seconds_total", 0.0),
        "queue_dropped_audio_s": final.get("rtsed_queue_dropped_audio_seconds_total", 0.0),
        "step_latency": worst_step_latency(warm[1], last[1]) if window else None,
        "max_backlog_s": max((max(s[2], s[3]) for s in steady), default=None),
        "idle_rss_mb": round(sum(idle_rss.values()), 1),
        "steady_rss_mb": round(sum(steady_rss.values()), 1) if steady_rss else None,
        "rss_mb_by_process": {"idle": idle_rss, "steady": steady_rss},
        # Cores each process kept busy between the warm-up and the end of the audio.
        "cpu_cores_by_process": ({role: round((last[2][role] - warm[2][role]) / (last[0] - warm[0]), 4)
                                  for role in pids} if window else None),
        "counters_per_s": ({k: round((last[3][k] - warm[3][k]) / (last[0] - warm[0]), 1) for k in last[3]}
                           if window else None),
        "onset_latency": latency_summary([x for r in results for x in r["onset_latency_s"]]),
        "event_latency": latency_summary([x for r in results for x in r["event_latency_s"]]),
        "ended": sum(1 for r in results if r["end"] is not None),
        "errors": sorted({r["error"] for r in results if r["error"]}),
        "client_max_late_s": round(max(r["max_late_s"] for r in results), 3),
        "client_late_blocks": sum(r["late_blocks"] for r in results),
        "events": sum(len(r["events"]) for r in results),
        "rss_samples": [(s[0], round(sum(s[1].values()), 2)) for s in samples],
    }
    cores = record["cpu_cores_by_process"]
    record["cpu_cores"] = round(sum(cores.values()), 4) if cores else None
    record["cpu_cores_per_stream"] = round(record["cpu_cores"] / n, 5) if cores else None
    lat = record["step_latency"]
    record["client_limited"] = record["client_max_late_s"] > args.max_client_late_s
    record["sustained"] = bool(
        record["dropped_audio_s"] == 0 and record["queue_dropped_audio_s"] == 0 and lat and lat["p99_bound_s"]
        is not None and lat["p99_bound_s"] <= STEP_LATENCY_LIMIT_S and record["max_backlog_s"] is not None
        and record["max_backlog_s"] <= args.max_backlog_s and record["ended"] == n and not record["client_limited"])
    if check_events:
        record["event_check"] = compare_events(args, backend, results, scene_args, seconds)
    return record


def compare_events(args, backend: str, results: list[dict], scene_args: tuple, seconds: float) -> dict:
    """Each stream's events against single-stream rtsed.detect on exactly the audio it sent."""
    import soundfile as sf

    from rtsed.cli.detect import detect_file
    from rtsed.models.bundled import resolve_model
    from rtsed.serve.engine import make_stepper

    scenes = load_scenes(*scene_args)
    stepper, config, _ = make_stepper(resolve_model(args.model), backend, threads=1)
    mismatched, expected_total = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in results:
            path = Path(tmp) / f"stream{r['index']}.wav"
            x = np.frombuffer(to_s16le(stream_audio(scenes, r["index"], seconds, args.rate)), "<i2")
            sf.write(path, x, args.rate, subtype="PCM_16")
            events, _ = detect_file(path, stepper, config)
            expected = sorted((e.label, e.onset_s, e.offset_s) for e in events)
            expected_total += len(expected)
            got = sorted(tuple(e) for e in r["events"])
            same = [e[0] for e in got] == [e[0] for e in expected] and all(
                abs(a[1] - b[1]) <= HOP_S + 1e-6 for a, b in zip(got, expected))
            if not same:
                mismatched.append({"stream": r["index"], "got": got, "expected": expected})
    return {"streams": len(results), "expected_events": expected_total, "mismatched_streams": mismatched,
            "equal": not mismatched}


# ------------------------------------------------------------------------------ search and soak
def capacity(args, backend: str, deploy=InProcess, label: str | None = None) -> dict:
    """Doubling from --start until a trial fails, then bisection down to --resolution."""
    trials = []

    def run(n: int) -> bool:
        record = trial(args, backend, n, args.trial_s, check_events=False, deploy=deploy)
        trials.append(record)
        print(f"  {label or backend} N={n}: {'sustained' if record['sustained'] else 'NOT sustained'} "
              f"(dropped {record['dropped_audio_s'] + record['queue_dropped_audio_s']:.2f} s, step p99 <= "
              f"{(record['step_latency'] or {}).get('p99_bound_s')} s, backlog {record['max_backlog_s']} s, "
              f"client late {record['client_max_late_s']} s)", file=sys.stderr, flush=True)
        return record["sustained"]

    good, bad = 0, None
    n = args.start
    while n <= args.max_n:
        if not run(n):
            bad = n
            break
        good, n = n, n * 2
    while bad is not None and bad - good > max(1, int(args.resolution * good)):
        mid = (good + bad) // 2
        good, bad = (mid, bad) if run(mid) else (good, mid)
    client_limited = any(t["client_limited"] for t in trials if t["streams"] == bad)
    return {"backend": backend, "max_streams_sustained": good, "first_failing": bad,
            "failure_was_client_limited": client_limited, "mb_per_stream": rss_slope(trials), "trials": trials}


def rss_slope(trials: list[dict]) -> float | None:
    """MB of server RSS per stream: least squares over (0, idle RSS) and (N, steady RSS) of every trial."""
    points = [(0, t["idle_rss_mb"]) for t in trials] + [(t["streams"], t["steady_rss_mb"]) for t in trials
                                                          if t["steady_rss_mb"] is not None]
    ns = np.array([p[0] for p in points], float)
    if len(set(ns)) < 2:
        return None
    return round(float(np.polyfit(ns, np.array([p[1] for p in points], float), 1)[0]), 3)


def soak(args, backend: str) -> dict:
    record = trial(args, backend, args.streams, args.soak, check_events=True, rss_every_s=5.0)
    samples = [(t, rss) for t, rss in record["rss_samples"] if min(60.0, args.soak / 4) <= t <= args.soak - 1.0]
    growth = None
    if len(samples) >= 2:
        t, rss = np.array(samples).T
        growth = float(np.polyfit(t, rss, 1)[0] * (t[-1] - t[0]))
    record["rss_growth_mb"] = None if growth is None else round(growth, 2)
    record["memory_flat"] = growth is not None and growth <= max(5.0, 0.01 * float(np.median(rss)))
    return record


def machine() -> dict:
    import platform

    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def summary_line(result: dict) -> str:
    load = result["machine"]["load_avg_1min"]
    if "soak" in result:
        s = result["soak"]
        check = s["event_check"]
        return (f"serve_load soak {s['backend']}: {s['streams']} streams x {s['seconds']:g} s: "
                f"{'sustained' if s['sustained'] else 'NOT sustained'}, memory "
                f"{'flat' if s['memory_flat'] else 'NOT flat'} ({s['rss_growth_mb']} MB growth), events "
                f"{'equal' if check['equal'] else 'DIFFER'} to rtsed.detect in "
                f"{check['streams'] - len(check['mismatched_streams'])}/{check['streams']} streams "
                f"({check['expected_events']} events); load avg {load}")
    c = result["capacity"]
    limited = " (the failing trial's clients fell behind: client-limited)" if c["failure_was_client_limited"] else ""
    return (f"serve_load {c['backend']}: {c['max_streams_sustained']} streams sustained (first failing: "
            f"{c['first_failing']}){limited}; {c['mb_per_stream']} MB per stream; load avg {load}")


def add_trial_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a trial and of the capacity search (benchmarks.cluster_load takes them too)."""
    p.add_argument("--model", default="dnd_7_10.pt")
    p.add_argument("--scenes", help="folder of scene recordings (default: procedural scenes)")
    p.add_argument("--rate", type=int, default=16000, help="the clients' sample rate in Hz (s16le mono)")
    p.add_argument("--trial-s", type=float, default=60.0, help="seconds of audio per stream in a trial")
    p.add_argument("--warmup-s", type=float, default=10.0, help="seconds before latency and backlog count")
    p.add_argument("--start", type=int, default=8, help="the search's first N")
    p.add_argument("--max-n", type=int, default=1024, help="the search's largest N")
    p.add_argument("--resolution", type=float, default=0.1, help="bisect until the bracket is this fraction of N")
    p.add_argument("--max-backlog-s", type=float, default=1.0)
    p.add_argument("--max-client-late-s", type=float, default=0.2,
                   help="a trial whose clients sent later than this is client-limited, not a server failure")
    p.add_argument("--client-procs", type=int, default=2, help="client processes (asyncio each)")
    p.add_argument("--server-args", default="", help="more rtsed.serve options, e.g. '--batch-streams 32'")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    add_trial_arguments(p)
    p.add_argument("--backend", action="append", choices=("torch", "onnx"), help="repeatable (default: torch)")
    p.add_argument("--streams", type=int, help="one trial (or the soak) at this N instead of the search")
    p.add_argument("--soak", type=float, metavar="SECONDS", help="soak: --streams streams for this long")
    p.add_argument("--check-events", action="store_true", help="compare events with rtsed.detect in a --streams trial")
    p.add_argument("--json", metavar="PATH", help="write the JSON here (default: stdout)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.soak is not None and not args.streams:
        raise SystemExit("--soak needs --streams N (the N the capacity search found)")
    results = []
    for backend in args.backend or ["torch"]:
        result = {"machine": machine(), "model": args.model, "scenes": args.scenes or "procedural"}
        if args.soak is not None:
            result["soak"] = soak(args, backend)
        elif args.streams:
            result["trial"] = trial(args, backend, args.streams, args.trial_s, check_events=args.check_events)
        else:
            result["capacity"] = capacity(args, backend)
        results.append(result)
    text = json.dumps(results, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)
    for result in results:
        if "trial" in result:
            t = result["trial"]
            print(f"serve_load trial {t['backend']}: {t['streams']} streams: "
                  f"{'sustained' if t['sustained'] else 'NOT sustained'}; load avg {result['machine']['load_avg_1min']}")
        else:
            print(summary_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
