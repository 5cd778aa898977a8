"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own so that several
servers in one process (tests) keep separate counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Bounds of the step-latency histogram (s): 0.02, the hop, is one of them, so "p99 under the hop"
# is read off a bucket exactly (benchmarks.serve_load's rule).
STEP_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class ServerMetrics:
    """Streams, steps (rate() of the counter gives steps/s), step latency, dropped audio, queue
    depth, closes by reason, events; the event outputs (MQTT, webhook) and the pulled inputs."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.streams = Gauge("rtsed_streams", "Streams connected (joining, live or ending)", registry=r)
        self.steps = Counter("rtsed_steps", "Batched model steps", registry=r)
        self.step_seconds = Histogram(
            "rtsed_step_seconds", "Wall time of one batched model step (front end excluded)", registry=r,
            buckets=STEP_BUCKETS_S)
        self.stepped_streams = Counter("rtsed_stepped_streams", "Stream-steps (streams taking part, summed)",
                                       registry=r)
        self.held_streams = Counter("rtsed_held_streams", "Stream-steps sat out for want of audio", registry=r)
        self.dropped_audio = Counter("rtsed_dropped_audio_seconds", "Audio dropped because the server was behind",
                                     registry=r)
        self.queue_dropped_audio = Counter(
            "rtsed_queue_dropped_audio_seconds",
            "Audio dropped, oldest first, from streams' frame queues because the model fell behind", registry=r)
        self.queued_audio = Gauge("rtsed_queued_audio_seconds", "Audio waiting for the worker or the model, all streams",
                                  registry=r)
        self.closed = Counter("rtsed_streams_closed", "Streams closed, by reason", ["reason"], registry=r)
        self.events = Counter("rtsed_events", "Finished sound events sent", registry=r)
        self.display_skipped = Counter("rtsed_display_frames_skipped",
                                       "Display messages skipped for slow readers", registry=r)
        self.mqtt_connected = Gauge("rtsed_mqtt_connected", "1 while connected to the MQTT broker", registry=r)
        self.mqtt_messages = Counter("rtsed_mqtt_messages",
                                     "MQTT messages: published (acknowledged by the broker) or dropped (queue full)",
                                     ["result"], registry=r)
        self.webhook_posts = Counter("rtsed_webhook_posts",
                                     "Events for the webhook: delivered, failed (refused or out of retries) or "
                                     "dropped (queue full, or unsent at shutdown)", ["result"], registry=r)
        self.webhook_retries = Counter("rtsed_webhook_retries", "Webhook POSTs retried after a failure", registry=r)
