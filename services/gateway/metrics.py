"""Prometheus metrics of the gateway (its own registry, served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "wombat_gateway_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "wombat_gateway_request_duration_seconds", "Arrival to the last byte, by route", ["route"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "wombat_gateway_time_to_first_token_seconds", "Arrival at the gateway to the first token from a replica",
            ["route"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "wombat_gateway_in_flight", "Generation requests being served", registry=registry
        )
        self.replica_requests = Counter(
            "wombat_gateway_replica_requests",
            "Generation requests sent, by the --upstream that names the replica (bounded: not the pod's IP)",
            ["upstream"],
            registry=registry,
        )
        self.replicas_up = Gauge(
            "wombat_gateway_replicas_up", "Replicas that answered the last poll", registry=registry
        )
