"""OpenAI requests to the inference contract, and the contract's responses back to OpenAI JSON.

The mapping (the README's gateway section shows it as a table):

- /v1/completions takes the prompt verbatim (PROMPT_FORMAT_RAW), as OpenAI's API does; a prompt of token
  ids is sent as PromptInput.token_ids.
- /v1/chat/completions renders the messages in the served model's default format: for Wombat models
  (default format alpaca) the Alpaca template with the last user message as the instruction (the
  template has no place for a system prompt or earlier turns, and the reference scripts never fill
  one); otherwise the tokenizer's chat template with every message ("developer" is sent as "system").
- max_tokens → max_new_tokens, min_tokens → min_new_tokens, temperature, top_p, seed, stop,
  stop_token_ids, top_k, min_p, repetition_penalty and ignore_eos keep their names; completions'
  `logprobs: k` and chat's `logprobs: true, top_logprobs: k` → logprobs with k alternatives.
- finish reasons: EOS, a stop string or a stop token → "stop"; max_tokens or the context's end → "length".
- the seed the request sampled with (its own, or the one the server drew) comes back as `seed`, an
  extension field beside OpenAI's, so an unseeded sample can be reproduced.
"""

from __future__ import annotations

from services.gateway.errors import OpenAIError
from services.gateway.schema import ChatCompletionRequest, CompletionRequest
from wombat.inference.v1 import inference_pb2 as pb

FINISH_REASONS = {
    pb.FINISH_REASON_EOS: "stop",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "abort",
}
# Contract field names (google.rpc.ErrorInfo metadata "field") as the OpenAI caller knows them.
OPENAI_FIELDS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def completion_prompt(request: CompletionRequest) -> pb.PromptInput:
    prompt = request.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a list of one prompt
    if isinstance(prompt, str):
        return pb.PromptInput(format=pb.PROMPT_FORMAT_RAW, text=prompt)
    return pb.PromptInput(token_ids=prompt)


def chat_prompt(request: ChatCompletionRequest, default_format: int) -> pb.PromptInput:
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
    return pb.PromptInput(format=pb.PROMPT_FORMAT_CHAT, messages=messages)


def sampling(request: CompletionRequest | ChatCompletionRequest, max_tokens: int | None) -> pb.SamplingParams:
    """Fields the caller left unset keep the server's defaults (which are OpenAI's: temperature 1, top_p 1)."""
    params = pb.SamplingParams(
        stop=[request.stop] if isinstance(request.stop, str) else (request.stop or []),
        stop_token_ids=request.stop_token_ids or [],
        ignore_eos=request.ignore_eos,
    )
    optional = {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k,
                "min_p": request.min_p, "repetition_penalty": request.repetition_penalty,
                "seed": request.seed, "min_new_tokens": request.min_tokens,
                "max_new_tokens": max_tokens}  # fmt: skip
    for name, value in optional.items():
        if value is not None:
            setattr(params, name, value)
    if isinstance(request, CompletionRequest) and request.logprobs is not None:
        params.logprobs, params.top_logprobs = True, request.logprobs
    if isinstance(request, ChatCompletionRequest) and request.logprobs:
        params.logprobs, params.top_logprobs = True, request.top_logprobs or 0
    return params


def usage(final: pb.GenerateResponse) -> dict:
    prompt, completion = final.usage.prompt_tokens, final.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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


def chat_logprobs(items) -> dict:
    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**entry(item.text, item.logprob), "top_logprobs": [entry(t.text, t.logprob) for t in item.top]}
            for item in items
        ]
    }
