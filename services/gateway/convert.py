"""OpenAI requests to the inference contract, and the contract's responses back to OpenAI JSON.

The mapping (the README's gateway section shows it as a table):

- /v1/completions takes each prompt verbatim (PROMPT_FORMAT_RAW), as OpenAI's API does; a prompt of token
  ids is sent as PromptInput.token_ids; vLLM's truncate_prompt_tokens is truncate_left_tokens.
- /v1/chat/completions renders the messages in the served model's default format: for Wombat models
  (default format alpaca) the Alpaca template with the last user message as the instruction (the
  template has no place for a system prompt or earlier turns, and the reference scripts never fill
  one); otherwise the tokenizer's chat template with every message ("developer" is sent as "system").
- max_tokens → max_new_tokens, min_tokens → min_new_tokens, temperature, top_p, seed, stop,
  stop_token_ids, top_k (-1 → 0), min_p, repetition_penalty, ignore_eos, presence_penalty,
  frequency_penalty, logit_bias and prompt_logprobs keep their names; completions' `logprobs: k` and
  chat's `logprobs: true, top_logprobs: k` → logprobs with k alternatives; completions' echo with
  logprobs → prompt_logprobs with k alternatives (and `max_tokens: 0` scores the prompt only).
- n > 1 and a batch of prompts: one Generate call per choice; choice i of a seeded request samples with
  seed + i (vLLM's rule), so each choice is reproducible on its own.
- response_format json_object / json_schema (its `schema`) → structured_output; chat tools with tool_choice
  "required" → a JSON array of {"name", "parameters"} calls over the tools' schemas (vLLM's rule), a named
  function → its parameters' schema; the output becomes `tool_calls`.
- finish reasons: EOS, a stop string or a stop token → "stop"; max_tokens or the context's end → "length".
  A request the replica cancelled (its deadline passed) is an error (504), not a finish reason: OpenAI
  has no "abort".
- the seed the request sampled with (its own, or the one the server drew) comes back as `seed`, an
  extension field beside OpenAI's, so an unseeded sample can be reproduced.
"""

from __future__ import annotations

import json
import re
import uuid

from services.gateway.errors import OpenAIError
from services.gateway.schema import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from wombat.inference.v1 import inference_pb2 as pb

FINISH_REASONS = {
    pb.FINISH_REASON_EOS: "stop",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
}
# Contract field names (google.rpc.ErrorInfo metadata "field") as the OpenAI caller knows them.
OPENAI_FIELDS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
                 "structured_output": "response_format"}  # fmt: skip


def completion_prompt(prompt: str | list[int], request: CompletionRequest) -> pb.PromptInput:
    message = (
        pb.PromptInput(format=pb.PROMPT_FORMAT_RAW, text=prompt)
        if isinstance(prompt, str)
        else pb.PromptInput(token_ids=prompt)
    )
    if request.truncate_prompt_tokens is not None:
        message.truncate_left_tokens = request.truncate_prompt_tokens
    if request.add_special_tokens is not None and isinstance(prompt, str):
        message.add_special_tokens = request.add_special_tokens
    return message


def chat_prompt(request: ChatCompletionRequest | TokenizeRequest, default_format: int,
                with_tools: bool = False) -> pb.PromptInput:  # fmt: skip
    if default_format == pb.PROMPT_FORMAT_ALPACA:
        users = [m for m in request.messages if m.role == "user"]
        if not users:
            raise OpenAIError(
                400, "messages must hold a user message (its text is the instruction)", "messages"
            )
        return pb.PromptInput(format=pb.PROMPT_FORMAT_ALPACA, text=users[-1].text())
    messages = [
        pb.ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
        for m in request.messages
    ]
    message = pb.PromptInput(format=pb.PROMPT_FORMAT_CHAT, messages=messages)
    if with_tools and getattr(request, "tools", None):  # the template renders them (it declares tool use)
        message.tools_json = json.dumps(request.tools)
    if getattr(request, "truncate_prompt_tokens", None) is not None:
        message.truncate_left_tokens = request.truncate_prompt_tokens
    if request.add_special_tokens is not None:
        message.add_special_tokens = request.add_special_tokens
    return message


def sampling(request: CompletionRequest | ChatCompletionRequest, max_tokens: int | None) -> pb.SamplingParams:
    """Fields the caller left unset keep the server's defaults (which are OpenAI's: temperature 1, top_p 1)."""
    params = pb.SamplingParams(
        stop=[request.stop] if isinstance(request.stop, str) else (request.stop or []),
        stop_token_ids=request.stop_token_ids or [],
        ignore_eos=bool(request.ignore_eos),
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias={int(token): bias for token, bias in (request.logit_bias or {}).items()},
    )
    optional = {"temperature": request.temperature, "top_p": request.top_p,
                "top_k": max(request.top_k, 0) if request.top_k is not None else None,
                "min_p": request.min_p, "repetition_penalty": request.repetition_penalty,
                "seed": request.seed, "min_new_tokens": request.min_tokens,
                "max_new_tokens": max_tokens}  # fmt: skip
    for name, value in optional.items():
        if value is not None:
            setattr(params, name, value)
    if isinstance(request, CompletionRequest):
        if request.logprobs is not None:
            params.logprobs, params.top_logprobs = True, request.logprobs
        if request.prompt_logprobs is not None:
            params.prompt_logprobs = request.prompt_logprobs
        elif request.echo and request.logprobs is not None:
            params.prompt_logprobs = request.logprobs
        elif request.echo and request.new_tokens == 0:  # the prompt echoed alone: scored, nothing generated
            params.prompt_logprobs = 0
    if isinstance(request, ChatCompletionRequest) and request.logprobs:
        params.logprobs, params.top_logprobs = True, request.top_logprobs or 0
    structured = structured_output(request)
    if structured is not None:
        params.structured_output.CopyFrom(structured)
    return params


def structured_output(request: CompletionRequest | ChatCompletionRequest) -> pb.StructuredOutput | None:
    if isinstance(request, ChatCompletionRequest) and request.calls_tools:
        named = request.named_tool()
        if named is not None:
            return pb.StructuredOutput(json_schema=json.dumps(_parameters(named)))
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                  "properties": {"name": {"const": t["function"]["name"]}, "parameters": _parameters(t["function"])}}
                 for t in request.tools]  # fmt: skip
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if request.parallel_tool_calls is False:  # OpenAI's switch: at most one call
            schema["maxItems"] = 1
        return pb.StructuredOutput(json_schema=json.dumps(schema))
    kind = (request.response_format or {}).get("type")
    if kind == "json_object":
        return pb.StructuredOutput(json_object=True)
    if kind == "json_schema":
        return pb.StructuredOutput(json_schema=json.dumps(request.response_format["json_schema"]["schema"]))
    return None


def _parameters(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}}


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def auto_tool_calls(request: ChatCompletionRequest, text: str) -> tuple[str | None, list[dict] | None]:
    """tool_choice "auto": the model wrote its calls in its own format. Two formats are parsed (vLLM's
    `hermes` and `llama3_json` parsers): `<tool_call>{"name", "arguments"}</tool_call>` blocks (Hermes,
    Qwen), or the whole output one JSON object {"name", "parameters" | "arguments"} (Llama 3.1). Anything
    else, or a call to a tool the request does not offer, is plain content. Returns (content, calls)."""
    blocks = _HERMES_CALL.findall(text)
    candidates = blocks or ([text.strip()] if text.strip().startswith("{") else [])
    names = {t["function"]["name"] for t in request.tools or []}
    calls = []
    for block in candidates:
        try:
            value = json.loads(block)
        except ValueError:
            return text, None
        arguments = value.get("arguments", value.get("parameters")) if isinstance(value, dict) else None
        if not isinstance(arguments, dict) or value.get("name") not in names:
            return text, None
        calls.append(_call(value["name"], arguments))
    if not calls:
        return text, None
    content = _HERMES_CALL.sub("", text).strip() if blocks else ""
    return content or None, calls


def _call(name: str, arguments) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}  # fmt: skip


def tool_calls(request: ChatCompletionRequest, text: str) -> list[dict] | None:
    """The output of a tool-calling request as OpenAI's tool_calls; None when it is not complete JSON (the
    output was cut by max_tokens): the caller then gets the text as content."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    named = request.named_tool()
    calls = [(named["name"], value)] if named is not None else [(c["name"], c["parameters"]) for c in value]
    return [_call(name, arguments) for name, arguments in calls]


def for_choice(params: pb.SamplingParams, index: int) -> pb.SamplingParams:
    """Choice `index`'s parameters: a seeded request's choice i samples with seed + i."""
    if index == 0 or not params.HasField("seed"):
        return params
    choice = pb.SamplingParams()
    choice.CopyFrom(params)
    choice.seed = (params.seed + index) % 2**63
    return choice


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def completion_logprobs(items, offset: int) -> dict:
    """OpenAI's legacy completions logprobs: parallel lists, `top_logprobs` as {token text: logprob}."""
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.text)
    return {
        "tokens": [item.text for item in items],
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": [{top.text: top.logprob for top in item.top} for item in items],
        "text_offset": offsets,
    }


def echoed_logprobs(prompt_text: str, prompt_items, items) -> dict:
    """Completions logprobs with echo: the prompt's tokens first. The first prompt token has no logprob
    (null, as OpenAI and vLLM send); its text is what the prompt's text holds before the other tokens'."""
    rest = "".join(item.text for item in prompt_items)
    first_text = prompt_text[: len(prompt_text) - len(rest)] if prompt_text.endswith(rest) else ""
    scored = completion_logprobs([*prompt_items, *items], len(first_text))
    return {
        "tokens": [first_text, *scored["tokens"]],
        "token_logprobs": [None, *scored["token_logprobs"]],
        "top_logprobs": [None, *scored["top_logprobs"]],
        "text_offset": [0, *scored["text_offset"]],
    }


def chat_logprobs(items) -> dict:
    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**entry(item.text, item.logprob), "top_logprobs": [entry(t.text, t.logprob) for t in item.top]}
            for item in items
        ]
    }
