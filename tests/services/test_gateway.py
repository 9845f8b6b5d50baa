"""The gateway's routing and lifecycle: a `wombat serve gateway` process in front of real inference servers
(tiny random models, in this process), driven with the real openai SDK."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from clients.inference import InferenceClient, prompt, sampling
from services.gateway.replicas import Balance, Replica, ReplicaPool
from services.stack import ServiceProcess
from tests.conftest import ServerThread
from tests.engine_fixtures import save_servable_tiny_model
from wombat.inference.v1 import inference_pb2 as pb

pytestmark = pytest.mark.slow
MODEL = "tiny-wombat"
LONG = sampling(temperature=0, max_new_tokens=4000, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_servable_tiny_model(tmp_path_factory.mktemp("gateway") / MODEL, context=8192)


def _replica(model_dir, port: int = 0) -> ServerThread:
    from services.inference.server import InferenceService, InferenceSettings
    from services.scaffold import ServerConfig

    settings = InferenceSettings(model_dir=model_dir, max_batch_size=1, max_queue=0)
    config = ServerConfig(host="127.0.0.1", port=port, metrics_port=None)
    return ServerThread(InferenceService(settings), config)


@pytest.fixture(scope="module")
def replicas(model_dir):
    started = [_replica(model_dir), _replica(model_dir)]
    yield started
    for replica in started:
        replica.stop()


def _gateway(tmp_path, *upstreams: str, extra: tuple[str, ...] = ()) -> ServiceProcess:
    args = ["gateway", "--port", "0", "--poll-seconds", "0.05", "--drain-seconds", "20", *extra]
    for upstream in upstreams:
        args += ["--upstream", upstream]
    return ServiceProcess(args, tmp_path / "gateway.log", drain_seconds=20, ready_timeout=60)


def _sdk(gateway_port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key="unused", max_retries=0)


@contextlib.contextmanager
def _occupied(replica: ServerThread) -> Iterator[None]:
    """Holds the replica's only slot with a long generation for the block."""
    with InferenceClient(replica.address, timeout=120) as client:
        stream = client.generate(prompt("x"), LONG)
        next(stream)
        try:
            yield
        finally:
            stream.cancel()


def _wait_for_load(replica: ServerThread, running: int) -> None:
    deadline = time.monotonic() + 10
    while replica.servicer.backend.stats().running != running:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _replica_requests(gateway: ServiceProcess) -> dict:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/metrics", timeout=2).read().decode()
    except (urllib.error.URLError, ConnectionError):
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["upstream"]: s.value for f in text_string_to_metric_families(body) for s in f.samples
            if s.name == "wombat_gateway_replica_requests_total"}  # fmt: skip


def test_least_loaded_sends_requests_to_the_idle_replica(replicas, tmp_path):
    busy, idle = replicas
    gateway = _gateway(tmp_path, busy.address, idle.address)
    try:
        with _occupied(busy):
            time.sleep(0.3)
            sdk = _sdk(gateway.port)
            for _ in range(4):
                sdk.completions.create(model=MODEL, prompt="hello", max_tokens=2, temperature=0)
            assert _replica_requests(gateway) == {idle.address: 4}
    finally:
        gateway.stop()


def test_round_robin_fails_over_from_a_full_replica(replicas, tmp_path):
    """Round-robin ignores load, so half the picks land on the full replica: its RESOURCE_EXHAUSTED comes
    before any token, and the gateway tries the next replica instead of failing the caller."""
    busy, idle = replicas
    gateway = _gateway(tmp_path, busy.address, idle.address, extra=("--balance", "round-robin"))
    try:
        with _occupied(busy):
            sdk = _sdk(gateway.port)
            for _ in range(4):
                assert sdk.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0).choices
            assert _replica_requests(gateway) == {idle.address: 4}
    finally:
        gateway.stop()


def test_every_replica_full_is_rate_limit_error(replicas, tmp_path):
    gateway = _gateway(tmp_path, *(r.address for r in replicas))
    try:
        with _occupied(replicas[0]), _occupied(replicas[1]):
            with pytest.raises(openai.RateLimitError) as caught:
                _sdk(gateway.port).completions.create(model=MODEL, prompt="hi", max_tokens=2)
            assert caught.value.response.headers["retry-after"] == "1"
    finally:
        gateway.stop()


def test_a_request_too_large_for_grpc_is_413_not_a_retried_429(replicas, tmp_path):
    """A body the gateway accepts (its cap raised to 32 MiB here) but gRPC's 16 MiB message limit refuses:
    gRPC's own RESOURCE_EXHAUSTED, raised in the client, is the request's fault, so no replica is tried
    after it and the caller gets 413, not the 429 with Retry-After that SDKs would retry forever."""
    gateway = _gateway(tmp_path, *(r.address for r in replicas), extra=("--max-body-bytes", str(32 * 2**20)))
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            _sdk(gateway.port).completions.create(model=MODEL, prompt="x" * (17 * 2**20), max_tokens=1)
        assert caught.value.status_code == 413 and "too large" in caught.value.body["message"]
        assert _replica_requests(gateway) == {}  # no replica was counted as tried
    finally:
        gateway.stop()


def test_draining_refuses_new_requests_with_503_and_finishes_open_streams(replicas, tmp_path):
    gateway = _gateway(tmp_path, replicas[1].address)
    sdk = _sdk(gateway.port)
    _wait_for_load(replicas[1], 0)
    stream = sdk.completions.create(model=MODEL, prompt="hi", max_tokens=300, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    chunks = iter(stream)
    next(chunks)
    gateway.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(openai.InternalServerError) as caught:
        sdk.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert caught.value.status_code == 503 and "shutting down" in caught.value.body["message"]
    with pytest.raises(urllib.error.HTTPError) as health:
        urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/health", timeout=2)
    assert health.value.code == 503
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"
    assert sum(len(c.choices[0].text) > 0 for c in rest if c.choices) > 100  # the stream ran to its end
    assert gateway.process.wait(20) == 0


def test_health_is_503_until_a_replica_answers(model_dir, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "gateway.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "gateway", "--port", "0",
                                    "--poll-seconds", "0.05", "--upstream", f"127.0.0.1:{port}"],
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    replica = None
    try:
        deadline = time.monotonic() + 60
        while "WOMBAT_LISTENING" not in log.read_text():
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.05)
        http_port = int(log.read_text().split("WOMBAT_LISTENING port=")[1].split()[0])
        for path in ("/health", "/v1/models"):
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=2)
            assert caught.value.code == 503
        replica = _replica(model_dir, port)
        while "WOMBAT_READY" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2).status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        if replica is not None:
            replica.stop()


def _fake(address: str, running: int, waiting: int = 0, up: bool = True) -> Replica:
    load = pb.GetLoadResponse(running_requests=running, waiting_requests=waiting, max_batch_size=4)
    return Replica(address, client=None, up=up, load=load)


def test_candidates_order_by_load_then_rotate_and_put_down_replicas_last():
    pool = ReplicaPool(["a", "b", "c"])
    pool.replicas = [_fake("a", 3), _fake("b", 1, waiting=1), _fake("c", 0, up=False)]
    assert [r.address for r in pool.candidates()] == ["b", "a", "c"]
    pool.replicas = [_fake("a", 1), _fake("b", 1), _fake("c", 1)]
    firsts = {pool.candidates()[0].address for _ in range(3)}
    assert firsts == {"a", "b", "c"}  # equal load: rotation
    pool.replicas[1].sent_since_poll = 4  # a burst sent there since the last poll counts
    assert all(pool.candidates()[-1].address == "b" for _ in range(3))
    rr = ReplicaPool(["a", "b"], Balance.ROUND_ROBIN)
    rr.replicas = [_fake("a", 4), _fake("b", 0)]
    assert [rr.candidates()[0].address for _ in range(4)] == ["a", "b", "a", "b"]


def test_a_dns_upstream_is_one_replica_per_address_and_follows_the_name():
    import asyncio

    async def run() -> tuple[list[str], list[str]]:
        pool = ReplicaPool(["dns:///localhost:50999", "127.0.0.1:50998"])
        await pool._resolve()
        resolved = [r.address for r in pool.replicas]
        pool.addresses = ["127.0.0.1:50998"]  # the name no longer lists the pod: its replica is retired
        await pool._resolve()
        remaining = [r.address for r in pool.replicas]
        await pool.close()
        return resolved, remaining

    resolved, remaining = asyncio.run(run())
    assert "127.0.0.1:50999" in resolved and "127.0.0.1:50998" in resolved
    assert remaining == ["127.0.0.1:50998"]


def test_auto_tool_calls_parse_hermes_blocks_and_llama3_json_and_leave_anything_else_as_content():
    from services.gateway.convert import auto_tool_calls
    from services.gateway.schema import ChatCompletionRequest

    request = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])  # fmt: skip
    content, calls = auto_tool_calls(request, 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": '
                                              '{"city": "Paris"}}\n</tool_call>')  # fmt: skip
    assert content == "Checking." and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"} and calls[0]["id"].startswith(
        "call_"
    )
    content, calls = auto_tool_calls(request, '{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    for text in (
        "It is sunny.",
        '{"name": "launch_rockets", "arguments": {}}',
        "<tool_call>{broken</tool_call>",
    ):
        assert auto_tool_calls(request, text) == (text, None)
