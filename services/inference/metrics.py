"""Prometheus metrics of the inference service, registered in the server's own registry.

Every value is exported twice: as a `wombat_inference_*` series, and under the vLLM name routers already
scrape (Gateway API Inference Extension, llm-d, KEDA and HPA recipes written for vLLM), labelled
`model_name` as vLLM labels it. Where the value differs in meaning from vLLM's, the difference is:

- `vllm:num_requests_running` counts requests in the running batch, being prefilled or decoded (as vLLM).
- `vllm:kv_cache_usage_perc` is a fraction in [0, 1] (vLLM's too, despite the name). With the vLLM
  backend it is vLLM's own figure (paged blocks in use). With the in-house engine it is the share of the
  per-slot KV cache that running requests hold (wombat_core/engine/kv_cache.py): it reaches 1 only when
  every slot holds a full context.

The same series come from both engine backends: vLLM's own Prometheus logger is not installed, so no
series is registered twice; what the vLLM backend adds is read from vLLM's scheduler stats.
- `vllm:request_success_total{finished_reason}` uses vLLM's reasons: "stop" (EOS, a stop string or stop
  token), "length", and "abort" (cancelled: the client went away or its deadline passed).
- `vllm:inter_token_latency_seconds`, `vllm:time_to_first_token_seconds` and
  `vllm:e2e_request_latency_seconds` are timed by when the engine made each token, from the request's
  arrival at the engine.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from wombat_core.engine import StreamEvent
from wombat_core.engine.backend import EngineBackend
from wombat_core.engine.types import FinishReason

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, float("inf"))
VLLM_FINISH_REASONS = {
    FinishReason.EOS: "stop",
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "abort",
}


class _Twin:
    """One value, two series: `wombat_inference_<name>` and `vllm:<vllm_name>{model_name}`."""

    def __init__(self, kind, name: str, vllm_name: str, documentation: str, registry, model_name: str, **kw):
        self.own = kind(f"wombat_inference_{name}", documentation, registry=registry, **kw)
        self.vllm = kind(f"vllm:{vllm_name}", documentation, ["model_name"], registry=registry, **kw)
        self.vllm = self.vllm.labels(model_name)

    def set_function(self, function: Callable[[], float]) -> None:
        self.own.set_function(function)
        self.vllm.set_function(function)

    def observe(self, value: float) -> None:
        self.own.observe(value)
        self.vllm.observe(value)

    def inc(self, amount: float = 1) -> None:
        self.own.inc(amount)
        self.vllm.inc(amount)


class InferenceMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str):
        def twin(kind, name: str, vllm_name: str, documentation: str, **kw) -> _Twin:
            return _Twin(kind, name, vllm_name, documentation, registry, model_name, **kw)

        self.queue_depth = twin(
            Gauge, "queue_depth", "num_requests_waiting", "Requests waiting for a batch slot"
        )
        self.running = twin(Gauge, "running_sequences", "num_requests_running",
                            "Requests in the running batch (prefilling or decoding)")  # fmt: skip
        self.kv_cache_usage = twin(Gauge, "kv_cache_usage", "kv_cache_usage_perc",
                                   "Fraction of the preallocated KV cache held by running requests")  # fmt: skip
        self.ttft = twin(Histogram, "time_to_first_token_seconds", "time_to_first_token_seconds",
                         "Arrival to the first token the engine produced", buckets=LATENCY_BUCKETS)  # fmt: skip
        self.inter_token = twin(Histogram, "inter_token_seconds", "inter_token_latency_seconds",
                                "Time between consecutive tokens of a request, as the engine produced them",
                                buckets=LATENCY_BUCKETS)  # fmt: skip
        self.e2e = twin(Histogram, "e2e_request_latency_seconds", "e2e_request_latency_seconds",
                        "Arrival to the end of a request (cancelled ones included)",
                        buckets=LATENCY_BUCKETS)  # fmt: skip
        self.request_prompt_tokens = twin(Histogram, "request_prompt_tokens", "request_prompt_tokens",
                                          "Prompt tokens per request (after truncation)",
                                          buckets=TOKEN_BUCKETS)  # fmt: skip
        self.prompt_tokens = twin(
            Counter, "prompt_tokens", "prompt_tokens", "Prompt tokens of finished requests"
        )
        self.generated_tokens = twin(Counter, "generated_tokens", "generation_tokens", "Tokens generated")
        self.finished = Counter(
            "wombat_inference_requests_finished", "Requests by finish reason", ["reason"], registry=registry
        )
        self.vllm_success = Counter(
            "vllm:request_success", "Finished requests by vLLM's finish reason", ["model_name", "finished_reason"],
            registry=registry,
        )  # fmt: skip
        self.model_name = model_name

    def watch(self, backend: EngineBackend) -> None:
        self.queue_depth.set_function(lambda: backend.stats().waiting)
        self.running.set_function(lambda: backend.stats().in_batch)
        self.kv_cache_usage.set_function(lambda: backend.stats().kv_cache_usage)
        backend.set_on_finish(self._finished)

    def _finished(self, event: StreamEvent) -> None:
        """Engine thread, every request's last event (prometheus_client is thread-safe)."""
        self.finished.labels(event.finish_reason.value).inc()
        self.vllm_success.labels(self.model_name, VLLM_FINISH_REASONS[event.finish_reason]).inc()
        if event.usage is not None:
            self.prompt_tokens.inc(event.usage.prompt_tokens)
            self.request_prompt_tokens.observe(event.usage.prompt_tokens)
        if event.timings is not None:
            self.e2e.observe(event.timings.total_seconds)
