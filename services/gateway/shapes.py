"""The OpenAI objects of the two generation endpoints, from the choices' messages.

/v1/completions: `text_completion` objects with the legacy logprobs (parallel lists); with echo, each
choice's text starts with its prompt, and its logprobs with the prompt's tokens (the first one's
`null`), as OpenAI and vLLM return them. /v1/chat/completions: `chat.completion` objects and
`chat.completion.chunk` deltas. The seed a choice sampled with rides beside OpenAI's fields, as `seed`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from services.gateway import convert
from services.gateway.generation import ChoiceSpec, Identity, Outcome
from services.gateway.schema import ChatCompletionRequest, CompletionRequest
from wombat.inference.v1 import inference_pb2 as pb


def _finished(message: pb.GenerateResponse) -> bool:
    return message.finish_reason != pb.FINISH_REASON_UNSPECIFIED


def _vllm_prompt_logprobs(items) -> list:
    """vLLM's `prompt_logprobs` extra: per prompt token (null first), {token id: {logprob, rank, text}}."""
    positions = [None]
    for item in items:
        entry = {str(t.token_id): {"logprob": t.logprob, "rank": rank, "decoded_token": t.text}
                 for rank, t in enumerate(item.top, start=1)}  # fmt: skip
        entry.setdefault(
            str(item.token_id), {"logprob": item.logprob, "rank": None, "decoded_token": item.text}
        )
        positions.append(entry)
    return positions


class CompletionShape:
    prefix = "cmpl"
    kind = "text_completion"
    # Contract field names (ErrorInfo "field") as a caller of this endpoint knows them.
    field_names = {**convert.OPENAI_FIELDS, "prompt": "prompt", "top_logprobs": "logprobs",
                   "prompt_logprobs": "prompt_logprobs"}  # fmt: skip

    def __init__(self, request: CompletionRequest):
        self.echo = bool(request.echo)
        self.logprobs = request.logprobs is not None
        self.prompt_logprobs = request.prompt_logprobs is not None

    def whole(self, spec: ChoiceSpec, outcome: Outcome) -> dict:
        final = outcome.final
        prefix = spec.prompt_text if self.echo else ""
        logprobs = None
        if self.logprobs and self.echo:
            logprobs = convert.echoed_logprobs(prefix, outcome.prompt_logprobs, outcome.logprobs)
        elif self.logprobs:
            logprobs = convert.completion_logprobs(outcome.logprobs, 0)
        choice = {"index": spec.index, "text": prefix + outcome.text, "logprobs": logprobs,
                  "finish_reason": convert.FINISH_REASONS[final.finish_reason], "seed": final.seed}  # fmt: skip
        if self.prompt_logprobs:
            choice["prompt_logprobs"] = _vllm_prompt_logprobs(outcome.prompt_logprobs)
        return choice

    async def chunks(
        self, spec: ChoiceSpec, messages: AsyncIterator[pb.GenerateResponse]
    ) -> AsyncIterator[dict]:
        offset, first = 0, True
        async for message in messages:
            text, logprobs = message.text, None
            if first and self.echo:
                text = spec.prompt_text + text
                if self.logprobs:
                    logprobs = convert.echoed_logprobs(
                        spec.prompt_text, message.prompt_logprobs, message.logprobs
                    )
            elif self.logprobs:
                logprobs = convert.completion_logprobs(message.logprobs, offset)
            offset += len(text)
            finished = _finished(message)
            choice = {"index": spec.index, "text": text, "logprobs": logprobs,
                      "finish_reason": convert.FINISH_REASONS[message.finish_reason] if finished else None}  # fmt: skip
            if first and self.prompt_logprobs:
                choice["prompt_logprobs"] = _vllm_prompt_logprobs(message.prompt_logprobs)
            if finished:
                choice["seed"] = message.seed
            first = False
            yield choice


class ChatShape:
    prefix = "chatcmpl"
    kind = "chat.completion"
    field_names = {**convert.OPENAI_FIELDS, "prompt": "messages", "top_logprobs": "top_logprobs"}

    def __init__(self, request: ChatCompletionRequest):
        self.request = request
        self.logprobs = bool(request.logprobs)
        if request.calls_tools:
            self.field_names = {**self.field_names, "structured_output": "tools"}

    def _message(self, text: str, reason: str) -> tuple[dict, str]:
        """The assistant message and finish reason: tool calls when the request called tools and the output
        is complete (finish "tool_calls" for "required", "stop" for a named function, as OpenAI)."""
        if self.request.may_call_tools:  # "auto": the model's own call format, parsed
            content, calls = convert.auto_tool_calls(self.request, text)
            if calls is None:
                return {"role": "assistant", "content": text}, reason
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
        calls = convert.tool_calls(self.request, text) if self.request.calls_tools else None
        if calls is None:
            return {"role": "assistant", "content": text}, reason
        named = self.request.named_tool() is not None
        return {"role": "assistant", "content": None, "tool_calls": calls}, "stop" if named else "tool_calls"

    def whole(self, spec: ChoiceSpec, outcome: Outcome) -> dict:
        final = outcome.final
        message, reason = self._message(outcome.text, convert.FINISH_REASONS[final.finish_reason])
        return {"index": spec.index, "message": message, "finish_reason": reason,
                "logprobs": convert.chat_logprobs(outcome.logprobs) if self.logprobs else None,
                "seed": final.seed}  # fmt: skip

    async def chunks(
        self, spec: ChoiceSpec, messages: AsyncIterator[pb.GenerateResponse]
    ) -> AsyncIterator[dict]:
        def choice(delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
            return {"index": spec.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

        yield choice({"role": "assistant", "content": ""})
        if self.request.calls_tools or self.request.may_call_tools:  # calls go out whole, once complete
            texts = []
            async for message in messages:
                texts.append(message.text)
                if _finished(message):
                    whole, reason = self._message(
                        "".join(texts), convert.FINISH_REASONS[message.finish_reason]
                    )
                    calls = whole.get("tool_calls")
                    delta = {"content": whole["content"]} if whole["content"] is not None else {}
                    if calls:
                        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
                    yield choice(delta)
                    yield {**choice({}, reason), "seed": message.seed}
            return
        async for message in messages:
            logprobs = convert.chat_logprobs(message.logprobs) if self.logprobs and message.logprobs else None
            if message.text or logprobs:
                yield choice({"content": message.text}, logprobs=logprobs)
            if _finished(message):
                yield {**choice({}, convert.FINISH_REASONS[message.finish_reason]), "seed": message.seed}


def response(identity: Identity, shape, choices: list[dict], usage: dict) -> dict:
    """The whole object; `seed` is the first choice's (choice i of a request sampled with seed + i)."""
    seeds = [choice.pop("seed") for choice in choices]
    return {**identity.fields(shape.kind), "choices": choices, "usage": usage, "seed": seeds[0]}


def chunk(identity: Identity, shape, choice: dict) -> dict:
    """One choice's chunk; the chunk that finishes a choice carries the seed it sampled with."""
    kind = "chat.completion.chunk" if shape.kind == "chat.completion" else shape.kind
    seed = choice.pop("seed", None)
    return {**identity.fields(kind), "choices": [choice], **({"seed": seed} if seed is not None else {})}


def usage_chunk(identity: Identity, shape, usage: dict) -> dict:
    kind = "chat.completion.chunk" if shape.kind == "chat.completion" else shape.kind
    return {**identity.fields(kind), "choices": [], "usage": usage}
