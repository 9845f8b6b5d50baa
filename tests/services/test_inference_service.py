"""InferenceService over real gRPC: token identity with HF generate, streaming text, and status codes."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.base import error_info
from clients.inference import AsyncInferenceClient, InferenceClient, prompt, sampling
from tests.conftest import ServerThread, rpc_error
from tests.engine_fixtures import save_cycling_model, save_servable_tiny_model
from wombat.inference.v1 import inference_pb2 as pb
from wombat_core.engine.loading import load_for_serving
from wombat_core.prompts import alpaca_prompt


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_servable_tiny_model(tmp_path_factory.mktemp("inference") / "tiny-wombat")


def _server(model_dir, *, load: bool = True, **settings) -> ServerThread:
    from services.inference.server import InferenceService, InferenceSettings

    return ServerThread(InferenceService(InferenceSettings(model_dir=model_dir, **settings)), load=load)


@pytest.fixture(scope="module")
def long_context_dir(tmp_path_factory):
    """Context 8192, so a request can run for many seconds (for slot, queue and deadline tests)."""
    return save_servable_tiny_model(tmp_path_factory.mktemp("long") / "tiny-long", context=8192)


@pytest.fixture(scope="module")
def server(model_dir):
    thread = _server(model_dir, max_batch_size=4, max_queue=8)
    yield thread
    thread.stop()


@pytest.fixture
def client(server):
    with InferenceClient(server.address, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def reference(model_dir):
    loaded = load_for_serving(model_dir)

    def greedy(text: str, max_new_tokens: int, template: bool = True) -> list[int]:
        rendered = alpaca_prompt(text) if template else text
        ids = loaded.tokenizer(rendered)["input_ids"]
        out = loaded.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                                    eos_token_id=2, pad_token_id=loaded.tokenizer.pad_token_id)  # fmt: skip
        return out[0, len(ids) :].tolist()

    return greedy


GREEDY = sampling(temperature=0, max_new_tokens=16)


def test_greedy_stream_is_token_identical_to_hf_generate(client, reference):
    responses = list(client.generate(prompt("Name three colours."), GREEDY))
    tokens = [t for r in responses for t in r.token_ids]
    assert tokens == reference("Name three colours.", 16)
    final = responses[-1]
    assert final.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    assert final.usage.completion_tokens == len(tokens) and final.usage.prompt_tokens > 20
    assert (
        final.timings.time_to_first_token_seconds > 0
        and final.timings.total_seconds >= final.timings.queue_seconds
    )
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])


def test_concurrent_requests_are_each_token_identical(server, reference):
    instructions = [
        "Name three colours.",
        "Say hello.",
        "你好世界",
        "Count 1234567890.",
        "café?",
        "🦘 wombat",
        "Why?",
    ]
    results: dict[str, list[int]] = {}

    def run(text: str) -> None:
        with InferenceClient(server.address, timeout=60) as own:
            results[text] = list(own.complete(prompt(text), GREEDY).token_ids)

    threads = [threading.Thread(target=run, args=(text,)) for text in instructions]
    for thread in threads:
        thread.start()
        time.sleep(0.005)
    for thread in threads:
        thread.join(60)
    assert {text: reference(text, 16) for text in instructions} == results


def test_raw_format_and_seeded_sampling(client, reference):
    raw = client.complete(prompt("The quick brown fox", format="raw"), GREEDY)
    assert list(raw.token_ids) == reference("The quick brown fox", 16, template=False)
    seeded = sampling(temperature=0.8, top_p=0.95, max_new_tokens=12, seed=7, ignore_eos=True)
    first = client.complete(prompt("Say hello."), seeded)
    second = client.complete(prompt("Say hello."), seeded)
    assert list(first.token_ids) == list(second.token_ids) and first.text == second.text


def test_utf8_stream_never_splits_emoji_or_cjk(tmp_path):
    """Byte-fallback tokens of 4-byte emoji and 3-byte CJK characters stream whole characters only."""
    text = "袋熊🦘é"  # not in the tokenizer's training text: 3 + 3 + 4 byte tokens, then "é"
    model_dir, cycle = save_cycling_model(tmp_path / "cycle", text)
    assert len(cycle) == 11
    thread = _server(model_dir)
    try:
        with InferenceClient(thread.address, timeout=60) as client:
            params = sampling(temperature=0, max_new_tokens=3 * len(cycle), ignore_eos=True)
            responses = list(client.generate(prompt(text, format="raw"), params))
    finally:
        thread.stop()
    chunks = [r.text for r in responses]
    assert "".join(chunks) == text * 3
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert set("".join(chunks)) == set(text)
    # Messages for byte tokens that completed no character carry token ids but no text yet.
    assert any(r.token_ids and not r.text for r in responses)


def test_tokenize_and_model_info(client):
    tokenized = client.tokenize(prompt("Name three colours."))
    assert tokenized.rendered == alpaca_prompt("Name three colours.")
    assert len(tokenized.tokens) == len(tokenized.token_ids) > 20
    info = client.model_info()
    assert info.name == "tiny-wombat" and info.context_length == 256 and info.vocab_size == 401
    assert info.default_prompt_format == pb.PROMPT_FORMAT_ALPACA and info.max_batch_size == 4
    assert info.dtype == "float32" and info.device == "cpu" and info.eos_token_id == 2
    assert list(info.eos_token_ids) == [2]


def test_a_prompt_of_token_ids_is_used_as_it_is(client, reference):
    ids = list(client.tokenize(prompt("Name three colours.")).token_ids)
    result = client.complete(prompt(token_ids=ids), GREEDY)
    assert list(result.token_ids) == reference("Name three colours.", 16)
    assert result.usage.prompt_tokens == len(ids)
    tokenized = client.tokenize(prompt(token_ids=ids))
    assert list(tokenized.token_ids) == ids and tokenized.rendered.endswith("### Response:")


def test_the_seed_used_is_returned_and_reproduces_the_output(client):
    params = dict(temperature=1.0, max_new_tokens=12, ignore_eos=True)
    drawn = client.complete(prompt("Write a word."), sampling(**params))
    assert drawn.HasField("seed")
    again = client.complete(prompt("Write a word."), sampling(**params, seed=drawn.seed))
    assert again.seed == drawn.seed and list(again.token_ids) == list(drawn.token_ids)
    streamed = list(client.generate(prompt("Write a word."), sampling(**params, seed=drawn.seed)))
    assert streamed[-1].seed == drawn.seed
    assert not any(r.HasField("seed") for r in streamed[:-1])
    assert [t for r in streamed for t in r.token_ids] == list(drawn.token_ids)


@pytest.mark.parametrize(
    ("prompt_input", "params", "message"),
    [
        (prompt("x"), sampling(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
        (prompt("x"), sampling(temperature=-1), "temperature must be >= 0"),
        (prompt("x"), sampling(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (prompt("x"), sampling(max_new_tokens=5000), "max_new_tokens must be <= 4096"),
        (prompt("x"), sampling(stop_token_ids=[10_000]), "stop_token_ids must be < vocab size 401"),
        (prompt("x"), sampling(top_logprobs=50), "top_logprobs must be in [0, 20]"),
        (prompt(""), sampling(), "`text` (the instruction) is empty"),
        (prompt("x", format="chat"), sampling(), "chat prompts need at least one message"),
        (prompt(format="chat", messages=[("robot", "hi")]), sampling(), "chat message role must be one of"),
        (prompt("x", format="raw", input="y"), sampling(), "`input` is only for the alpaca format"),
        (prompt("word " * 400, format="raw"), sampling(), "the model's context is 256"),
        (prompt("x", truncate_left_tokens=0), sampling(), "truncate_left_tokens must be >= 1"),
        (prompt("x", token_ids=[5]), sampling(), "a prompt given as token_ids takes no format, text"),
        (prompt(token_ids=[5, 401]), sampling(), "prompt token_ids must be < the vocabulary size 401"),
    ],
    ids=lambda value: None,
)
def test_invalid_requests_get_invalid_argument(client, prompt_input, params, message):
    error = rpc_error(lambda: client.complete(prompt_input, params))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert error_info(error).reason == "INVALID_ARGUMENT"


def test_invalid_sampling_names_the_field_in_error_info(client):
    error = rpc_error(lambda: client.complete(prompt("x"), sampling(top_p=1.5)))
    info = error_info(error)
    assert info.domain == "wombat" and info.metadata["field"] == "top_p"


def test_left_truncation_is_explicit(client):
    long_prompt = prompt("word " * 400, format="raw", truncate_left_tokens=100)
    result = client.complete(long_prompt, sampling(temperature=0, max_new_tokens=2))
    assert result.usage.prompt_tokens == 100 and result.usage.truncated_prompt_tokens > 300


def _wait_for_free_slot(engine, limit: float = 2.0) -> float:
    started = time.monotonic()
    while engine.stats().running or engine.stats().prefilling:
        assert time.monotonic() - started < limit, "the slot was not freed"
        time.sleep(0.001)
    return time.monotonic() - started


def test_deadline_exceeded_and_cancel_free_the_slot(long_context_dir):
    thread = _server(long_context_dir, max_batch_size=1, max_queue=0)
    engine = thread.servicer.backend
    long = sampling(temperature=0, max_new_tokens=4000, ignore_eos=True)
    try:
        with InferenceClient(thread.address, timeout=0.3) as hurried:
            error = rpc_error(lambda: hurried.complete(prompt("x"), long))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_for_free_slot(engine)
        with InferenceClient(thread.address, timeout=30) as client:
            stream = client.generate(prompt("x"), long)
            next(stream)
            stream.cancel()
            assert _wait_for_free_slot(engine) < 1.0
            # The only slot is free again: a new request is served at once, not refused.
            result = client.complete(prompt("x"), sampling(temperature=0, max_new_tokens=2))
            assert result.usage.completion_tokens == 2
    finally:
        thread.stop()


def test_full_queue_is_resource_exhausted_immediately(long_context_dir):
    thread = _server(long_context_dir, max_batch_size=1, max_queue=1)
    try:
        with InferenceClient(thread.address, timeout=30) as client:
            long = sampling(temperature=0, max_new_tokens=4000, ignore_eos=True)
            running = client.generate(prompt("a"), long)
            next(running)
            queued = client.generate(prompt("b"), long)
            while thread.servicer.backend.stats().waiting == 0:
                time.sleep(0.005)
            load = client.get_load()
            assert (load.running_requests, load.waiting_requests) == (1, 1)
            assert (load.max_batch_size, load.max_waiting_requests) == (1, 1)
            assert 0 < load.kv_cache_usage < 1
            started = time.monotonic()
            error = rpc_error(lambda: client.complete(prompt("c"), long))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in error.details()
            assert time.monotonic() - started < 1.0
            info = error_info(error)
            assert info.reason == "RESOURCE_EXHAUSTED" and info.metadata["retry_after_seconds"] == "1"
            running.cancel()
            queued.cancel()
            while thread.servicer.backend.stats().running or thread.servicer.backend.stats().waiting:
                time.sleep(0.005)
            idle = client.get_load()
            assert (idle.running_requests, idle.waiting_requests, idle.kv_cache_usage) == (0, 0, 0)
    finally:
        thread.stop()


def test_not_serving_and_unavailable_before_the_model_is_loaded(model_dir):
    thread = _server(model_dir, load=False)
    try:
        with grpc.insecure_channel(thread.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with InferenceClient(thread.address, timeout=5) as client:
            error = rpc_error(lambda: client.complete(prompt("x"), GREEDY))
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "loading" in error.details()
    finally:
        thread.stop()


def _metrics(server) -> dict[tuple, float]:
    """The server's /metrics, scraped over HTTP and parsed: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def _moved(server, before: dict, expected: dict, limit: float = 5.0) -> dict:
    """Polls until every (name, labels) in `expected` has moved by its value (the engine counts a finish on
    its own thread, a moment after the caller has the response); returns how much everything moved."""
    deadline = time.monotonic() + limit
    while True:
        after = _metrics(server)
        moved = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
        if all(moved.get(key) == value for key, value in expected.items()) or time.monotonic() > deadline:
            return moved


def test_metrics_move_with_every_request(server, client):
    before = _metrics(server)
    complete = "/wombat.inference.v1.InferenceService/Complete"
    client.complete(prompt("Say hello."), sampling(temperature=0, max_new_tokens=5, ignore_eos=True))
    moved = _moved(server, before, {
        ("wombat_inference_generated_tokens_total", ()): 5,
        ("wombat_inference_requests_finished_total", (("reason", "length"),)): 1,
        ("wombat_rpc_requests_total", (("code", "OK"), ("method", complete))): 1,
    })  # fmt: skip
    assert moved[("wombat_inference_generated_tokens_total", ())] == 5
    assert moved[("wombat_inference_requests_finished_total", (("reason", "length"),))] == 1
    assert moved[("wombat_rpc_requests_total", (("code", "OK"), ("method", complete)))] == 1
    assert moved[("wombat_inference_time_to_first_token_seconds_count", ())] == 1
    assert moved[("wombat_inference_time_to_first_token_seconds_sum", ())] > 0
    # One interval per token after the first, however the tokens were grouped into messages.
    assert moved[("wombat_inference_inter_token_seconds_count", ())] == 4
    assert moved[("wombat_inference_inter_token_seconds_sum", ())] > 0
    assert moved[("wombat_inference_prompt_tokens_total", ())] > 20
    assert moved[("wombat_inference_request_prompt_tokens_count", ())] == 1
    assert moved[("wombat_inference_e2e_request_latency_seconds_count", ())] == 1


def test_vllm_named_metrics_move_with_the_same_values(server, client):
    model = (("model_name", "tiny-wombat"),)
    before = _metrics(server)
    result = client.complete(prompt("Say hello."), sampling(temperature=0, max_new_tokens=5, ignore_eos=True))
    moved = _moved(
        server, before, {("vllm:request_success_total", (*model, ("finished_reason", "length"))): 1}
    )
    assert moved[("vllm:request_success_total", (("finished_reason", "length"), *model))] == 1
    assert moved[("vllm:generation_tokens_total", model)] == 5
    assert moved[("vllm:prompt_tokens_total", model)] == result.usage.prompt_tokens
    assert moved[("vllm:request_prompt_tokens_sum", model)] == result.usage.prompt_tokens
    assert moved[("vllm:time_to_first_token_seconds_count", model)] == 1
    assert moved[("vllm:inter_token_latency_seconds_count", model)] == 4
    assert moved[("vllm:e2e_request_latency_seconds_count", model)] == 1
    assert moved[("vllm:e2e_request_latency_seconds_sum", model)] > 0


def test_load_gauges_follow_a_running_request(server, client):
    running, waiting = ("wombat_inference_running_sequences", ()), ("wombat_inference_queue_depth", ())
    model = (("model_name", "tiny-wombat"),)
    vllm_running, vllm_waiting = ("vllm:num_requests_running", model), ("vllm:num_requests_waiting", model)
    kv, vllm_kv = ("wombat_inference_kv_cache_usage", ()), ("vllm:kv_cache_usage_perc", model)
    idle = _metrics(server)
    assert idle[running] == idle[waiting] == idle[vllm_running] == idle[vllm_waiting] == 0
    assert idle[kv] == idle[vllm_kv] == 0
    stream = client.generate(
        prompt("Say hello."), sampling(temperature=0, max_new_tokens=4000, ignore_eos=True)
    )
    next(stream)
    busy = _metrics(server)
    assert busy[running] == busy[vllm_running] == 1
    assert 0 < busy[kv] and busy[vllm_kv] == pytest.approx(busy[kv], abs=0.01)
    stream.cancel()
    moved = _moved(
        server, idle, {("wombat_inference_requests_finished_total", (("reason", "cancelled"),)): 1}
    )
    assert moved[("wombat_inference_requests_finished_total", (("reason", "cancelled"),))] == 1
    assert _metrics(server)[running] == 0


def test_async_client(server):
    import asyncio

    async def main():
        async with AsyncInferenceClient(server.address, timeout=30) as client:
            texts = [r.text async for r in client.generate(prompt("Say hello."), GREEDY)]
            complete = await client.complete(prompt("Say hello."), GREEDY)
            return "".join(texts), complete.text, (await client.model_info()).name

    streamed, completed, name = asyncio.run(main())
    assert streamed == completed and name == "tiny-wombat"


def test_a_dead_engine_turns_every_health_name_not_serving(model_dir, monkeypatch):
    """A step failure kills the engine: the stream in flight gets UNAVAILABLE, then readiness and liveness
    both say NOT_SERVING (the kubelet restarts the pod) and new calls are refused at once."""
    from services.scaffold.server import LIVENESS_SERVICE

    thread = _server(model_dir, max_batch_size=2)
    engine = thread.servicer.backend.engine
    try:
        with (
            InferenceClient(thread.address, timeout=30) as client,
            grpc.insecure_channel(thread.address) as channel,
        ):
            stream = client.generate(
                prompt("x"), sampling(temperature=0, max_new_tokens=200, ignore_eos=True)
            )
            next(stream)

            def broken(*args, **kwargs):
                raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

            monkeypatch.setattr(engine.runner, "step", broken)
            error = rpc_error(lambda: list(stream))
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "engine failed" in error.details()
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 5
            names = ["", "wombat.inference.v1.InferenceService", LIVENESS_SERVICE]

            def statuses():
                return [
                    health.Check(health_pb2.HealthCheckRequest(service=n), timeout=5).status for n in names
                ]

            while statuses() != [health_pb2.HealthCheckResponse.NOT_SERVING] * 3:
                assert time.monotonic() < deadline, statuses()
                time.sleep(0.02)
            started = time.monotonic()
            refused = rpc_error(lambda: client.complete(prompt("x"), GREEDY))
            assert refused.code() == grpc.StatusCode.UNAVAILABLE and "failed" in refused.details()
            assert time.monotonic() - started < 2
    finally:
        thread.stop()


def test_tokenisation_runs_off_the_event_loop(server, client, monkeypatch):
    import services.inference.servicer as servicer_module

    threads: list[str] = []
    encode = servicer_module.encode

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return encode(*args, **kwargs)

    monkeypatch.setattr(servicer_module, "encode", recording)
    client.complete(prompt("Say hello."), sampling(temperature=0, max_new_tokens=2))
    client.tokenize(prompt("Say hello."))
    loop_thread = server.thread.name
    assert len(threads) == 2 and loop_thread not in threads


def test_max_model_len_caps_the_context(model_dir):
    thread = _server(model_dir, max_model_len=40)
    try:
        with InferenceClient(thread.address, timeout=60) as client:
            assert client.model_info().context_length == 40
            ids = list(range(3, 33))  # 30 tokens: 10 more fit
            result = client.complete(
                prompt(token_ids=ids), sampling(temperature=0, max_new_tokens=100, ignore_eos=True)
            )
            assert result.finish_reason == pb.FINISH_REASON_LENGTH and result.usage.completion_tokens == 10
            error = rpc_error(lambda: client.complete(prompt(token_ids=list(range(3, 43))), GREEDY))
            assert (
                error.code() == grpc.StatusCode.INVALID_ARGUMENT
                and "the model's context is 40" in error.details()
            )
    finally:
        thread.stop()
