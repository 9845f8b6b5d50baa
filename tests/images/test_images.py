"""Each service image, started as its pod runs it, probed and used from the host, then stopped with
SIGTERM: it must drain and exit 0 within the grace period."""

from __future__ import annotations

import json
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.images.conftest import Container, image_size

pytestmark = pytest.mark.images


def _health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            .status
        )


def _record(report, image: str, container: Container, code: int, took: float) -> None:
    report[image] = {
        "size_mb": image_size(image) / 1e6,
        "ready_seconds": container.ready_after,
        "stop_seconds": took,
    }
    assert code == 0, container.logs()[-3000:]
    assert took < 30


def test_inference_image_streams_a_completion_from_a_read_only_store(store, report):
    from clients.inference import InferenceClient, prompt, sampling

    container = Container("wombat-it-inference", "inference",
                          ["--model", "/models/smollm2-135m", "--port", "50552", "--metrics-port", "9552",
                           "--health-port", "8552"], volumes=[f"{store / 'models'}:/models:ro"]).start()  # fmt: skip
    try:
        assert _health(8552, "wombat.inference.v1.InferenceService") == health_pb2.HealthCheckResponse.SERVING
        with InferenceClient("127.0.0.1:50552", timeout=120) as client:
            text = "".join(r.text for r in client.generate(prompt("What is the capital of France?"),
                                                           sampling(temperature=0, max_new_tokens=16)))  # fmt: skip
        assert "Paris" in text
    finally:
        code, took = container.stop()
    _record(report, "inference", container, code, took)


def test_materializer_image_makes_and_applies_a_delta_into_the_mounted_store(store, report):
    from clients.materializer import MaterializerClient, delta_options
    from wombat_core.manifest import verify_directory

    container = Container("wombat-it-materializer", "materializer",
                          ["--model-root", "/models", "--port", "50551", "--metrics-port", "9551",
                           "--health-port", "8551"], volumes=[f"{store / 'models'}:/models"]).start()  # fmt: skip
    try:
        assert (
            _health(8551, "wombat.materializer.v1.MaterializerService")
            == health_pb2.HealthCheckResponse.SERVING
        )
        options = delta_options("float32", pad_vocab=True)
        with MaterializerClient("127.0.0.1:50551", timeout=300) as client:
            list(client.make_delta("tiny-base", "tiny-target", "tiny-delta", options))
            list(client.materialize("tiny-base", "tiny-delta", "tiny-recovered", options))
            assert client.verify("tiny-recovered").ok
    finally:
        code, took = container.stop()
    assert verify_directory(
        store / "models" / "tiny-recovered"
    ).ok  # from the host too: whole, not half-written
    _record(report, "materializer", container, code, took)


def test_rrhf_image_scores_with_a_local_ray_inside(store, report):
    from clients.rrhf import RrhfClient

    container = Container("wombat-it-rrhf", "rrhf",
                          ["--model-root", "/models", "--data-root", "/data", "--port", "50553",
                           "--metrics-port", "9553", "--health-port", "8553"],
                          volumes=[f"{store / 'models'}:/models:ro", f"{store / 'data'}:/data"]).start(timeout=300)  # fmt: skip
    try:
        assert _health(8553, "wombat.rrhf.v1.RrhfService") == health_pb2.HealthCheckResponse.SERVING
        with RrhfClient("127.0.0.1:50553", timeout=300) as client:
            scores = client.score("Say hi.", ["Hello!", "Go away."], model_path="smollm2-135m")
        assert len(scores.scores) == 2
    finally:
        code, took = container.stop()
    _record(report, "rrhf", container, code, took)


def test_gateway_image_answers_the_openai_api_over_the_inference_image(store, report):
    import openai

    inference = Container("wombat-it-inference-2", "inference",
                          ["--model", "/models/smollm2-135m", "--port", "50554", "--metrics-port", "-1"],
                          volumes=[f"{store / 'models'}:/models:ro"]).start()  # fmt: skip
    try:
        gateway = Container(
            "wombat-it-gateway", "gateway", ["--upstream", "127.0.0.1:50554", "--port", "8555"]
        ).start()
        try:
            health = json.loads(urllib.request.urlopen("http://127.0.0.1:8555/health", timeout=10).read())
            assert health["status"] == "ok"
            client = openai.OpenAI(base_url="http://127.0.0.1:8555/v1", api_key="unused")
            chunks = client.completions.create(model="smollm2-135m", prompt="The capital of France is",
                                               max_tokens=8, temperature=0, stream=True)  # fmt: skip
            assert "Paris" in "".join(c.choices[0].text for c in chunks if c.choices)
        finally:
            code, took = gateway.stop()
        _record(report, "gateway", gateway, code, took)
    finally:
        inference.stop()
