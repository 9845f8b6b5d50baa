"""What the callers that exist send, through `wombat serve gateway` in front of a real `wombat serve inference`
on SmolLM2-135M (each backend in turn): echo with prompt logprobs (lm-eval's loglikelihood requests),
batched prompts and n, penalties and logit_bias, /tokenize and /detokenize, explicit nulls, and the edge.
Every response and chunk is validated with the openai package's own models: the SDK itself does not
validate, so a wrong shape would pass unnoticed."""

from __future__ import annotations

import http.client
import json
import socket
import time

import openai
import pytest
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from clients.inference import InferenceClient
from services.stack import ServiceProcess
from tests.e2e.conftest import CALLERS_KEY, gateway_stack

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
KEY = CALLERS_KEY


@pytest.fixture(scope="module", params=["wombat", pytest.param("vllm", marks=pytest.mark.vllm)])
def stack(request, demo_workdir, tmp_path_factory):
    """Each engine backend behind the same gateway setup. Tests of the gateway's own edge (nothing of the
    engine in them) take only the in-house one: `@ON_ONE_BACKEND`."""
    if request.param == "wombat":
        yield request.getfixturevalue("callers_stack")
        return
    with gateway_stack(demo_workdir, tmp_path_factory.mktemp("callers-logs"), engine=request.param, batch=8, queue=64,
                       api_key=KEY, gateway_args=("--max-body-bytes", "65536")) as stack:  # fmt: skip
        yield stack


# The gateway's edge is the same whatever engine is behind it.
ON_ONE_BACKEND = pytest.mark.parametrize("stack", ["wombat"], indirect=True)


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{stack[1].port}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def hf(demo_workdir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = demo_workdir / "models" / MODEL
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory)


def post(port: int, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", path, payload, {"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), json.loads(data) if data else {}


def validate_completion(body: dict) -> None:
    """openai.types.Completion.model_validate, but for the one place where OpenAI's API itself departs from
    the SDK's types: with echo, the first prompt token has no logprob, and OpenAI (as vLLM) sends `null`
    for it in token_logprobs and top_logprobs, which the SDK types as floats and dicts only. Those nulls
    are checked here and left out of the validation. Likewise a streamed chunk before a choice's last has
    `finish_reason: null`, as OpenAI streams it, where the SDK's type (shared by chunks) wants a reason."""
    body = json.loads(json.dumps(body))
    for choice in body["choices"]:
        if choice["finish_reason"] is None:
            choice["finish_reason"] = "length"
        logprobs = choice.get("logprobs")
        if logprobs and logprobs["token_logprobs"] and logprobs["token_logprobs"][0] is None:
            assert logprobs["top_logprobs"][0] is None
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                logprobs[key] = logprobs[key][1:]
    Completion.model_validate(body)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


# --- echo and prompt logprobs: what lm-eval's loglikelihood requests send -----------------------------


def test_echo_with_logprobs_on_batched_token_prompts_equals_hf_log_softmax(stack, client, hf):
    """lm-eval's request: token-id prompts batched in one request, echo, logprobs 1, max_tokens 1 (and 0).
    Every prompt token's logprob equals HF's log-softmax over the same ids to 1e-4."""
    model, tokenizer = hf
    texts = ["The capital of France is Paris", "Two plus two equals four, and three plus three"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    for max_tokens in (1, 0):
        result = client.completions.create(model=MODEL, prompt=prompts, max_tokens=max_tokens, echo=True,
                                           logprobs=1, temperature=0)  # fmt: skip
        validate_completion(result.model_dump())
        assert [c.index for c in result.choices] == [0, 1]
        for ids, choice in zip(prompts, result.choices, strict=True):
            logprobs = choice.logprobs
            assert len(logprobs.tokens) == len(ids) + max_tokens
            assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
            with torch.no_grad():
                reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            expected = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            got = torch.tensor(logprobs.token_logprobs[1 : len(ids)], dtype=torch.float32)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
            best = reference[: len(ids) - 1].max(-1).values  # lm-eval's is_greedy compares with the top entry
            tops = torch.tensor([max(top.values()) for top in logprobs.top_logprobs[1 : len(ids)]])
            torch.testing.assert_close(tops, best, atol=1e-4, rtol=0)
            assert choice.text.startswith(tokenizer.decode(ids)) and "".join(logprobs.tokens) == choice.text
            assert logprobs.text_offset == [
                sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(ids) + max_tokens)
            ]
        assert result.usage.completion_tokens == max_tokens * len(prompts)


def test_echo_streams_the_prompt_first_and_prompt_logprobs_extra(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, echo=True,
                                            temperature=0, stream=True))  # fmt: skip
    for c in chunks:
        validate_completion(c.model_dump())
    assert chunks[0].choices[0].text.startswith("Hello there")
    echoed = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=0, echo=True)
    assert echoed.choices[0].text == "Hello there" and echoed.usage.completion_tokens == 0
    result = client.completions.create(model=MODEL, prompt="Hello there world", max_tokens=1, temperature=0,
                                       extra_body={"prompt_logprobs": 2})  # fmt: skip
    extra = result.choices[0].model_extra["prompt_logprobs"]
    assert extra[0] is None and len(extra) == result.usage.prompt_tokens
    assert all(1 <= len(position) <= 3 for position in extra[1:])


# --- n and batched prompts ------------------------------------------------------------------------------


def test_n_choices_are_indexed_and_choice_i_reproduces_with_seed_plus_i(client):
    many = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, n=3, seed=40,
                                     temperature=1.0)  # fmt: skip
    Completion.model_validate(many.model_dump())
    assert [c.index for c in many.choices] == [0, 1, 2]
    for i, choice in enumerate(many.choices):
        alone = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, seed=40 + i,
                                          temperature=1.0)  # fmt: skip
        assert alone.choices[0].text == choice.text
    single = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, seed=40)
    assert many.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert many.usage.completion_tokens == 3 * 8


def test_batched_prompts_times_n_are_prompt_major(client):
    prompts = ["Red", "Green", "Blue"]
    result = client.completions.create(model=MODEL, prompt=prompts, max_tokens=2, n=2, temperature=0)
    validate_completion(result.model_dump())
    assert [c.index for c in result.choices] == list(range(6))
    for p, prompt in enumerate(prompts):  # greedy: a prompt's two choices agree and equal it alone
        alone = (
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0).choices[0].text
        )
        assert result.choices[2 * p].text == result.choices[2 * p + 1].text == alone


def test_streaming_n_interleaves_choices_and_sums_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                            max_tokens=6, n=2, stream=True, seed=3,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    for c in chunks:
        ChatCompletionChunk.model_validate(c.model_dump())
    finished = {
        c.choices[0].index: c.choices[0].finish_reason
        for c in chunks
        if c.choices and c.choices[0].finish_reason
    }
    assert set(finished) == {0, 1} and set(finished.values()) <= {"stop", "length"}
    usage = chunks[-1].usage
    assert (
        chunks[-1].choices == []
        and usage.completion_tokens == sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
        or usage.completion_tokens >= 2
    )


# --- sampling controls callers send ------------------------------------------------------------------


def test_logit_bias_forces_a_token_and_penalties_change_greedy_output(client, hf):
    _, tokenizer = hf
    forced = tokenizer(" wombat")["input_ids"][0]
    result = client.completions.create(model=MODEL, prompt="The", max_tokens=4, temperature=0,
                                       logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})  # fmt: skip
    assert result.choices[0].text == tokenizer.decode([forced] * 4)
    prompt = "List the numbers: one, two, three, one, two, three,"
    plain = (
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    )
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=24, temperature=0, **penalty
        )
        ChatCompletion  # noqa: B018 - (chat shape validated elsewhere)
        assert penalised.choices[0].text != plain, f"{penalty} changed nothing"


# --- /tokenize, /detokenize ------------------------------------------------------------------------------


def test_tokenize_and_detokenize_in_vllms_shapes(stack, hf):
    _, tokenizer = hf
    port = stack[1].port
    status, _, body = post(port, "/tokenize", {"model": MODEL, "prompt": "Hello wombat", "return_token_strs": True},
                           auth())  # fmt: skip
    assert status == 200 and body["tokens"] == tokenizer("Hello wombat")["input_ids"]
    assert (
        body["count"] == len(body["tokens"])
        and body["max_model_len"] > 0
        and len(body["token_strs"]) == body["count"]
    )
    status, _, back = post(port, "/detokenize", {"model": MODEL, "tokens": body["tokens"]}, auth())
    assert status == 200 and back == {"prompt": "Hello wombat"}
    status, _, chat = post(port, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}, auth())
    assert status == 200 and chat["count"] > 2
    status, _, error = post(port, "/detokenize", {"tokens": [10**9]}, auth())
    assert status == 400 and error["error"]["param"] == "tokens"


# --- nulls and the edge --------------------------------------------------------------------------------


@ON_ONE_BACKEND
def test_explicit_nulls_are_accepted_where_openai_accepts_them(stack):
    port = stack[1].port
    nulls = {"n": None, "stream": None, "echo": None, "presence_penalty": None, "frequency_penalty": None,
             "logprobs": None, "logit_bias": None, "seed": None, "stop": None, "temperature": None, "user": None,
             "stream_options": None, "top_p": None}  # fmt: skip
    status, _, body = post(
        port, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **nulls}, auth()
    )
    assert status == 200, body
    validate_completion(body)
    chat_nulls = {k: v for k, v in nulls.items() if k != "echo"} | {"logprobs": None, "top_logprobs": None,
                                                                    "max_completion_tokens": None, "tools": None}  # fmt: skip
    status, _, body = post(port, "/v1/chat/completions",
                           {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **chat_nulls},
                           auth())  # fmt: skip
    assert status == 200, body
    ChatCompletion.model_validate(body)


@ON_ONE_BACKEND
def test_the_key_is_checked_before_the_body_is_parsed_and_the_body_is_capped(stack):
    port = stack[1].port
    status, _, body = post(port, "/v1/completions", b"{not json at all", {})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"  # not 400: nothing was parsed
    status, _, body = post(port, "/v1/completions", {"model": MODEL, "prompt": "x" * 70_000}, auth())
    assert status == 413 and body["error"]["type"] == "invalid_request_error"
    # Streamed without a length (chunked): cut at the cap all the same.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.putrequest("POST", "/v1/completions")
    for name, value in {"Content-Type": "application/json", "Transfer-Encoding": "chunked", **auth()}.items():
        connection.putheader(name, value)
    connection.endheaders()
    try:
        for _ in range(20):
            piece = b"x" * 8192
            connection.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        connection.send(b"0\r\n\r\n")
    except OSError:
        pass  # the server may answer and close before the whole body is sent
    assert connection.getresponse().status == 413


@ON_ONE_BACKEND
def test_a_non_ascii_request_id_is_sanitised_not_a_502(stack):
    status, headers, body = post(stack[1].port, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1},
                                 {**auth(), "x-request-id": "caf\u00e9-42".encode().decode("latin-1")})  # fmt: skip
    assert status == 200, body
    assert headers["x-request-id"] == "caf-42"


@ON_ONE_BACKEND
def test_an_empty_key_file_refuses_to_start(stack, tmp_path):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(Exception, match="exited|failed|API key is empty"):
        ServiceProcess(["gateway", "--upstream", stack[0].address, "--port", "0", "--api-key-file",
                        str(tmp_path / "empty")], tmp_path / "gateway.log", ready_timeout=30)  # fmt: skip
    assert "API key is empty" in (tmp_path / "gateway.log").read_text()


def _load(address: str) -> tuple[int, int]:
    with InferenceClient(address, timeout=10) as replica:
        load = replica.get_load()
    return load.running_requests, load.waiting_requests


@ON_ONE_BACKEND
def test_a_client_that_disconnects_while_queued_leaves_the_queue(stack, client):
    """Eight long streams fill the replica's slots; a ninth waits in its queue. Its client goes away before
    any token: the replica's queue empties at once, not when a slot frees."""
    inference, gateway = stack
    long = {"ignore_eos": True}
    streams = [client.completions.create(model=MODEL, prompt="Count:", max_tokens=400, stream=True, extra_body=long)
               for _ in range(8)]  # fmt: skip
    try:
        for stream in streams:
            next(iter(stream))
        body = json.dumps({"model": MODEL, "prompt": "queued", "max_tokens": 5}).encode()
        raw = socket.create_connection(("127.0.0.1", gateway.port))
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        deadline = time.monotonic() + 10
        while _load(inference.address)[1] < 1:
            assert time.monotonic() < deadline, "the ninth request never queued"
            time.sleep(0.02)
        raw.close()
        deadline = time.monotonic() + 5
        while _load(inference.address)[1] != 0:
            assert time.monotonic() < deadline, "the disconnected request kept its place in the queue"
            time.sleep(0.02)
        assert _load(inference.address)[0] == 8  # the running streams were untouched
    finally:
        for stream in streams:
            stream.close()


# --- structured output ------------------------------------------------------------------------------------

PICK = {"type": "object", "additionalProperties": False, "required": ["colour", "count"],
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 0,
                                                                             "maximum": 9}}}  # fmt: skip


def test_response_format_json_schema_and_json_object_on_both_endpoints(client):
    """SmolLM2 left alone does not write this JSON; constrained, every output parses and validates."""
    response_format = {"type": "json_schema", "json_schema": {"name": "pick", "schema": PICK, "strict": True}}
    for seed in (1, 2):
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick one."}],
                                              max_tokens=40, seed=seed, response_format=response_format)  # fmt: skip
        ChatCompletion.model_validate(chat.model_dump())
        value = json.loads(chat.choices[0].message.content)
        assert (
            value["colour"] in ("red", "green", "blue")
            and 0 <= value["count"] <= 9
            and set(value) == set(PICK["required"])
        )
        completion = client.completions.create(model=MODEL, prompt="Pick one:", max_tokens=40, seed=seed,
                                               extra_body={"response_format": response_format})  # fmt: skip
        assert json.loads(completion.choices[0].text)["colour"] in ("red", "green", "blue")
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please."}],
                                          max_tokens=60, temperature=0, response_format={"type": "json_object"})  # fmt: skip
    text = chat.choices[0].message.content
    assert text.startswith("{") and (
        chat.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict)
    )
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "bad", "schema": {"type": "nonsense"}}})  # fmt: skip
    assert caught.value.body["param"] == "response_format"


def test_tools_with_a_named_or_required_choice_return_tool_calls(client):
    tools = [{"type": "function", "function": {"name": "pick", "description": "Picks", "parameters": PICK}},
             {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {},
                                                                             "additionalProperties": False}}}]  # fmt: skip
    pick = {"type": "function", "function": {"name": "pick"}}
    named = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick."}], max_tokens=40,
                                           tools=tools, tool_choice=pick)  # fmt: skip
    ChatCompletion.model_validate(named.model_dump())
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "pick" and json.loads(call.function.arguments)["colour"] in (
        "red",
        "green",
        "blue",
    )
    assert named.choices[0].message.content is None and named.choices[0].finish_reason == "stop"
    required = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Call a tool."}],
                                              max_tokens=80, tools=tools, tool_choice="required", seed=5,
                                              parallel_tool_calls=False)  # fmt: skip
    calls = required.choices[0].message.tool_calls
    assert (
        calls
        and {c.function.name for c in calls} <= {"pick", "noop"}
        and required.choices[0].finish_reason == "tool_calls"
    )
    stream = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick."}],
                                                 max_tokens=40, tools=tools, stream=True,
                                                 tool_choice={"type": "function", "function": {"name": "pick"}}))  # fmt: skip
    for chunk in stream:
        ChatCompletionChunk.model_validate(chunk.model_dump())
    (streamed,) = [c for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert streamed.choices[0].delta.tool_calls[0].function.name == "pick"
    for choice, message in (("auto", "tool_choice"), (None, "tool_choice")):
        with pytest.raises(openai.BadRequestError) as caught:
            extra = {} if choice is None else {"tool_choice": choice}
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                           tools=tools, **extra)  # fmt: skip
        assert caught.value.body["param"] == message
