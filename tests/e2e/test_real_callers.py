"""The callers people point at an OpenAI-compatible server, for real, against `wombat serve gateway` in front
of `wombat serve inference` on SmolLM2-135M: lm-evaluation-harness's `local-completions` (a loglikelihood
task and a generate_until task shipped in tests/e2e/callers/, no hub), LangChain's `ChatOpenAI`
(streaming, `with_structured_output`, `bind_tools`), and schemathesis over the gateway's OpenAPI schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import openai
import pytest
import torch
from pydantic import BaseModel, Field

from tests.e2e.conftest import CALLERS_KEY

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
TASKS = Path(__file__).parent / "callers"


@pytest.fixture(scope="module")
def stack(callers_stack):
    return callers_stack


@pytest.fixture(scope="module")
def base_url(stack) -> str:
    return f"http://127.0.0.1:{stack[1].port}"


@pytest.fixture(scope="module")
def hf(demo_workdir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = demo_workdir / "models" / MODEL
    return AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(directory)


# --- lm-evaluation-harness ----------------------------------------------------------------------------


def test_lm_eval_local_completions_loglikelihoods_equal_hf_and_generate_until_runs(
    base_url, hf, tmp_path, monkeypatch
):
    """lm-eval as its users run it: `local-completions` with its defaults (it finds /tokenizer_info and
    /tokenize and tokenises remotely; batched token-id prompts with echo, logprobs 1 and max_tokens 1 for
    loglikelihoods). Each loglikelihood it reports equals HF's on the same ids to 1e-3."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", CALLERS_KEY)  # what local-completions sends as its bearer key
    for name in ("wombat_choice.yaml", "wombat_until.yaml", "choice.jsonl", "until.jsonl"):
        text = (TASKS / name).read_text()
        for data in ("choice.jsonl", "until.jsonl"):  # the datasets' paths, absolute
            text = text.replace(f"test: {data}", f"test: {tmp_path / data}")
        (tmp_path / name).write_text(text)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={MODEL},base_url={base_url}/v1/completions,num_concurrent=2,max_retries=1,"
        f"tokenized_requests=True,batch_size=4,auth_token={CALLERS_KEY}",
        tasks=["wombat_choice", "wombat_until"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    model, tokenizer = hf
    compared = 0
    for sample in results["samples"]["wombat_choice"]:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"], strict=True):
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            ids = context_ids + whole[len(context_ids) :]  # lm-eval's split of context and continuation
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            expected = sum(float(logprobs[t - 1, ids[t]]) for t in range(len(context_ids), len(ids)))
            assert response[0][0] == pytest.approx(expected, abs=1e-3), (context, continuation)
            compared += 1
    assert compared == 10
    assert "acc,none" in results["results"]["wombat_choice"]
    generations = [sample["resps"][0][0] for sample in results["samples"]["wombat_until"]]
    assert len(generations) == 2 and all(isinstance(g, str) and "\n" not in g for g in generations)
    assert "exact_match,none" in results["results"]["wombat_until"]


# --- LangChain ----------------------------------------------------------------------------------------


class Pick(BaseModel):
    colour: Literal["red", "green", "blue"]
    count: int = Field(ge=0, le=9)


def _chat(base_url: str, **options):
    from langchain_openai import ChatOpenAI

    options = {"temperature": 0, "max_tokens": 48, "max_retries": 0, **options}
    return ChatOpenAI(base_url=f"{base_url}/v1", api_key=CALLERS_KEY, model=MODEL, **options)


def test_langchain_streams_the_same_text_it_invokes(base_url):
    llm = _chat(base_url)
    streamed = "".join(chunk.content for chunk in llm.stream("Say hello to a wombat."))
    assert streamed and streamed == llm.invoke("Say hello to a wombat.").content


def test_langchain_with_structured_output_returns_the_pydantic_model(base_url):
    """LangChain's default method is OpenAI's json_schema response_format (strict): the output is
    constrained to the schema, parsed and validated into the model by LangChain itself."""
    result = _chat(base_url).with_structured_output(Pick).invoke("Pick a colour and a count.")
    assert isinstance(result, Pick)
    # json_mode is OpenAI's json_object: any JSON object, which LangChain parses as JSON.
    anything = {"title": "Anything", "description": "any JSON object", "type": "object"}
    as_json = _chat(base_url).with_structured_output(anything, method="json_mode").invoke("Reply in JSON.")
    assert isinstance(as_json, dict)


def test_langchain_bind_tools_calls_the_named_tool_and_a_required_one(base_url):
    from langchain_core.tools import tool

    @tool
    def add(a: int, b: int) -> int:
        """Adds two integers."""
        return a + b

    @tool
    def shout(text: str) -> str:
        """Shouts the text."""
        return text.upper()

    named = (
        _chat(base_url, max_tokens=64).bind_tools([add, shout], tool_choice="add").invoke("What is 2 plus 3?")
    )
    (call,) = named.tool_calls
    assert (
        call["name"] == "add"
        and set(call["args"]) == {"a", "b"}
        and all(isinstance(v, int) for v in call["args"].values())
    )
    required = (
        _chat(base_url, max_tokens=96)
        .bind_tools([add, shout], tool_choice="any", parallel_tool_calls=False)
        .invoke("Shout hello.")
    )
    assert required.tool_calls and all(c["name"] in ("add", "shout") for c in required.tool_calls)
    with pytest.raises(openai.BadRequestError, match="tool_choice"):  # "auto": no tool-call parser here
        _chat(base_url).bind_tools([add]).invoke("What is 2 plus 3?")


# --- schemathesis -------------------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error_and_every_client_error_is_openai_shaped(base_url):
    """Generated requests for every operation of the gateway's OpenAPI schema: no 5xx, and every 4xx in
    OpenAI's error shape."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    statuses: dict[int, int] = {}

    def check(operation, case) -> None:
        if isinstance(case.body, dict) and "model" in case.body:  # past the model check, into the parameters
            case.body["model"] = MODEL
        if isinstance(case.body, dict):  # keep generation short: a chat without a limit runs to the context
            limits = ("max_tokens", "max_completion_tokens")
            for key in limits:
                if isinstance(case.body.get(key), int):
                    case.body[key] = min(case.body[key], 4)
            if "messages" in case.body and all(case.body.get(key) is None for key in limits):
                case.body["max_tokens"] = 4
        response = case.call(
            base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {CALLERS_KEY}"}
        )
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (operation.path, case.body, response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text

    def runner(operation):
        @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case) -> None:
            check(operation, case)

        return run

    for result in schema.get_all_operations():
        runner(result.ok())()
    assert sum(statuses.values()) > 50 and any(400 <= s < 500 for s in statuses)
    print("schemathesis statuses:", json.dumps(dict(sorted(statuses.items()))))
