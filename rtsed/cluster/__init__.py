"""rtsed across machines on NATS: a gateway (``rtsed.serve --nats``) publishes every stream's
audio to a JetStream stream, workers (``rtsed.worker``) each own a partition of the streams, which
the NATS server's subject mapping assigns, and publish events back; a worker that dies hands its
partition to a standby that resumes every stream from the retained audio (docs/cluster.md).

This package imports rtsed.serve, never the reverse: the server learns of it through its command
line only."""
