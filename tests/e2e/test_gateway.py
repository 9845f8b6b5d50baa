"""The real `openai` SDK against `wombat serve gateway`, in front of a real `wombat serve inference` process
serving the SmolLM2-135M demo weights (each its own process, as in a pod)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients.inference import InferenceClient
from tests.e2e.conftest import gateway_stack

pytestmark = pytest.mark.slow

API_KEY = "test-key-0123456789"
MODEL = "smollm2-135m"
LONG = {"ignore_eos": True}  # vLLM's extension field, sent with extra_body


@pytest.fixture(scope="module", params=["wombat", pytest.param("vllm", marks=pytest.mark.vllm)])
def stack(request, demo_workdir, tmp_path_factory):
    """One inference replica (one slot, no queue: a second concurrent request is refused at once) and one
    gateway that checks an API key; the replica runs each engine backend in turn (vLLM in .venv-vllm)."""
    with gateway_stack(demo_workdir, tmp_path_factory.mktemp("gateway-logs"), engine=request.param, batch=1, queue=0,
                       metrics_port="0", api_key=API_KEY) as stack:  # fmt: skip
        yield stack


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    _, gateway = stack
    # No retries: a test of 429 must see the 429, not the SDK's retry of it.
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key=API_KEY, max_retries=0)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_completion_streaming_and_not_give_the_same_greedy_text(client):
    plain = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                            temperature=0, stream=True))  # fmt: skip
    assert "Paris" in plain.choices[0].text
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert plain.choices[0].finish_reason == "length" and chunks[-1].choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 8 and plain.usage.prompt_tokens == 5
    assert plain.usage.total_tokens == 13


def test_chat_streaming_and_not_give_the_same_greedy_text(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and "Paris" in text
    assert plain.choices[0].message.role == "assistant"
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_greedy_chat_equals_wombat_generate(stack, client):
    """Chat on a Wombat model is the Alpaca template with the user's message as the instruction, the same
    prompt `wombat generate` sends by default."""
    inference, _ = stack
    question = "Name a large animal."
    through_gateway = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "ignored"}, {"role": "user", "content": question}],
        max_tokens=24, temperature=0,
    ).choices[0].message.content  # fmt: skip
    cli = subprocess.run([sys.executable, "-m", "services.cli", "generate", question, "--server", inference.address,
                          "--temperature", "0", "--max-tokens", "24", "--json"],
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    direct = "".join(json.loads(line).get("text", "") for line in cli.stdout.splitlines() if line.strip())
    assert through_gateway == direct and direct


def test_stop_sequence_ends_the_text_without_it(client):
    result = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"]
    )
    text = result.choices[0].text
    assert result.choices[0].finish_reason == "stop"
    assert "5" in text and "7" not in text


def test_a_seed_reproduces_a_sample_and_an_unseeded_one_reports_its_seed(client):
    def sample(**extra):
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0,
                                         extra_body=LONG, **extra)  # fmt: skip

    first, second = sample(seed=1234), sample(seed=1234)
    assert first.choices[0].text == second.choices[0].text
    assert first.model_extra["seed"] == 1234
    unseeded = sample()
    drawn = unseeded.model_extra["seed"]
    assert sample(seed=drawn).choices[0].text == unseeded.choices[0].text


def test_logprobs_for_completions_and_chat(client):
    result = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                       temperature=0, logprobs=3)  # fmt: skip
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert "".join(logprobs.tokens) == result.choices[0].text
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the chosen token is the best
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(item.top_logprobs) == 2 and item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5)
               for item in content)  # fmt: skip


@pytest.mark.parametrize(
    ("arguments", "param", "message"),
    [
        ({"temperature": 5}, "temperature", "less than or equal to 2"),
        ({"n": 200}, "n", "less than or equal to 128"),
        ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
        ({"extra_body": {"top_k": -3}}, "top_k", "greater than or equal to -1"),
        ({"logit_bias": {"999999": 5}}, "logit_bias", "logit_bias token ids must be < vocab size"),
        ({"max_tokens": 10_000}, "max_tokens", "max_new_tokens must be <= 4096"),
        ({"max_tokens": 2**40}, "max_tokens", "less than or equal to 2147483647"),
        ({"extra_body": {"stop_token_ids": [2**33]}}, "stop_token_ids", "less than or equal to 2147483647"),
        ({"extra_body": {"include_stop_str_in_output": True}}, "include_stop_str_in_output", "not supported"),
    ],
    ids=[
        "temperature",
        "n",
        "presence_penalty",
        "top_k",
        "logit_bias (checked by the replica)",
        "max_tokens (checked by the replica)",
        "max_tokens beyond int32",
        "token ids beyond int32",
        "a vLLM extra this server does not do",
    ],  # fmt: skip
)
def test_a_bad_parameter_is_bad_request_naming_the_field(client, arguments, param, message):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x", **arguments)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param and message in caught.value.body["message"]


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x")


def test_a_wrong_key_is_authentication_error(stack):
    _, gateway = stack
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL, prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def _load(inference) -> tuple[int, int]:
    with InferenceClient(inference.address, timeout=10) as replica:
        load = replica.get_load()
    return load.running_requests, load.waiting_requests


def _wait_idle(inference, limit: float = 10.0) -> float:
    started = time.monotonic()
    while _load(inference) != (0, 0):
        assert time.monotonic() - started < limit, "the replica still runs the request"
        time.sleep(0.01)
    return time.monotonic() - started


def _generated_tokens(inference) -> float:
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{inference.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    return next(s.value for f in text_string_to_metric_families(body) for s in f.samples
                if s.name == "wombat_inference_generated_tokens_total")  # fmt: skip


def test_overload_is_rate_limit_error_with_retry_after(stack, client):
    inference, _ = stack
    _wait_idle(inference)
    busy = client.completions.create(model=MODEL, prompt="Count:", max_tokens=2000, temperature=0, stream=True,
                                     extra_body=LONG)  # fmt: skip
    next(iter(busy))  # the only slot is taken
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert caught.value.response.headers["retry-after"] == "1"
        assert "capacity" in caught.value.body["message"]
    finally:
        busy.close()
    _wait_idle(inference)


def test_a_client_that_closes_mid_stream_frees_the_slot_within_a_step(stack, client):
    inference, _ = stack
    _wait_idle(inference)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to 1000."}],
                                            max_tokens=2000, temperature=0, stream=True, extra_body=LONG)  # fmt: skip
    chunks = iter(stream)
    for _ in range(5):
        next(chunks)
    assert _load(inference) == (1, 0)
    at_close = _generated_tokens(inference)
    stream.close()  # closes the HTTP connection, as a client that goes away
    _wait_idle(inference)
    # The replica made at most the step in flight when the cancel arrived, and the one the HTTP
    # disconnect may have raced with: not the 2000 tokens asked for.
    assert _generated_tokens(inference) - at_close <= 2


def test_health_and_metrics(stack, client):
    _, gateway = stack
    base = f"http://127.0.0.1:{gateway.port}"
    health = json.loads(urllib.request.urlopen(f"{base}/health", timeout=5).read())
    assert health == {"status": "ok", "replicas_up": 1}

    def requests_ok() -> float:
        body = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        return sum(s.value for f in text_string_to_metric_families(body) for s in f.samples
                   if s.name == "wombat_gateway_requests_total" and s.labels == {"route": "/v1/completions",
                                                                                 "status": "200"})  # fmt: skip

    before = requests_ok()
    client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert requests_ok() - before == 1


def test_concurrent_sdk_callers_each_get_their_own_stream(stack, client):
    """Several SDK callers at once: each gets its own complete stream (the one slot serves them in turn or
    refuses with 429, which the SDK would retry; here every caller retries until served)."""
    results: dict[int, str] = {}

    def call(number: int) -> None:
        patient = client.with_options(max_retries=20)
        text = "".join(c.choices[0].text for c in patient.completions.create(
            model=MODEL, prompt=f"{number} + {number} =", max_tokens=4, temperature=0, stream=True) if c.choices)  # fmt: skip
        results[number] = text

    threads = [threading.Thread(target=call, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(results) == [0, 1, 2] and all(results.values())
