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
        self.graph_seconds = Counter("dllm_graph_seconds", "network time by graph (commit: prefill and finished blocks; "
                                     "block_step / decode / canvas: generation)", ["graph"], registry=self.registry)
        self.graph_calls = Counter("dllm_graph_calls", "network calls by graph", ["graph"], registry=self.registry)
        self.slots = Gauge("dllm_slots_in_use", "cache-pool rows owned by requests (cached families)", registry=self.registry)
        self.slots_total = Gauge("dllm_slots", "cache-pool rows (--max-batch; 0: the family keeps no cache)", registry=self.registry)
        self.first_call = Histogram("dllm_time_to_first_call_seconds", "from a request's arrival to its first network call",
                                    registry=self.registry, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))

    def observe(self, batch_rows: int, step_seconds: float, evaluations: int, graph: str = "canvas", waits: list[float] = ()) -> None:
        self.evaluations.inc(evaluations)
        self.step.observe(step_seconds)
        self.batch.observe(batch_rows)
        self.graph_seconds.labels(graph).inc(step_seconds)
        self.graph_calls.labels(graph).inc()
        for wait in waits:
            self.first_call.observe(wait)

    def render(self) -> bytes:
        return generate_latest(self.registry)
