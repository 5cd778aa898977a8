"""A worker's Prometheus metrics (``rtsed.worker --metrics-port``): the same names as the
server's for what a worker does (steps, their latency, streams, queued audio), so one dashboard
and the load benchmark's rule (step p99 under the hop) read both."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from rtsed.serve.telemetry import STEP_BUCKETS_S


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.streams = Gauge("rtsed_streams", "Streams this worker runs", registry=r)
        self.steps = Counter("rtsed_steps", "Batched model steps", registry=r)
        self.step_seconds = Histogram("rtsed_step_seconds", "Wall time of one batched model step (front end excluded)",
                                      registry=r, buckets=STEP_BUCKETS_S)
        self.queued_audio = Gauge("rtsed_queued_audio_seconds",
                                  "Audio received but not yet stepped, all this worker's streams", registry=r)

    def serve(self, port: int, host: str) -> None:
        """GET http://host:port/metrics from a daemon thread."""
        start_http_server(port, host, registry=self.registry)
