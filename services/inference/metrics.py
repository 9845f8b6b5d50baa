"""Prometheus metrics of the inference service, registered in the server's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from wombat_core.engine import Engine, StreamEvent

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf"))


class InferenceMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.queue_depth = Gauge(
            "wombat_inference_queue_depth", "Requests waiting for a batch slot", registry=registry
        )
        self.running = Gauge(
            "wombat_inference_running_sequences", "Sequences in the running batch", registry=registry
        )
        self.ttft = Histogram(
            "wombat_inference_time_to_first_token_seconds",
            "Arrival to the first token the engine produced",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "wombat_inference_inter_token_seconds",
            "Time between consecutive tokens of a request, as the engine produced them",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "wombat_inference_generated_tokens", "Tokens generated", registry=registry
        )
        self.finished = Counter(
            "wombat_inference_requests_finished", "Requests by finish reason", ["reason"], registry=registry
        )

    def watch(self, engine: Engine) -> None:
        self.queue_depth.set_function(lambda: engine.stats().waiting)
        self.running.set_function(lambda: (stats := engine.stats()).running + stats.prefilling)
        engine.on_finish = self._finished

    def _finished(self, event: StreamEvent) -> None:
        self.finished.labels(event.finish_reason.value).inc()
