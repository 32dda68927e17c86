"""The server's Prometheus metrics (prometheus-client, one registry per app)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("dllm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry)
        self.tokens = Counter("dllm_generated_tokens", "tokens generated (returned to clients)", registry=self.registry)
        self.evaluations = Counter("dllm_network_evaluations", "network calls (each serves a whole batch)", registry=self.registry)
        self.step = Histogram("dllm_step_seconds", "latency of one network call", registry=self.registry,
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
        self.queue = Gauge("dllm_queue_depth", "requests waiting to be admitted", registry=self.registry)
        self.batch = Histogram("dllm_batch_rows", "rows (samples) per network call", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64))

    def observe(self, batch_rows: int, step_seconds: float, evaluations: int) -> None:
        self.evaluations.inc(evaluations)
        self.step.observe(step_seconds)
        self.batch.observe(batch_rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
