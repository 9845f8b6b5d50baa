"""Conversions between inference protos and wombat_core.engine objects."""

from __future__ import annotations

from wombat.inference.v1 import inference_pb2 as pb
from wombat_core.engine import SamplingParams
from wombat_core.engine.prompting import PromptFormat, PromptSpec
from wombat_core.engine.sampling import StructuredOutput
from wombat_core.engine.types import FinishReason, StreamEvent, TokenLogprob
from wombat_core.errors import InvalidArgument

_FORMATS = {
    pb.PROMPT_FORMAT_UNSPECIFIED: None,
    pb.PROMPT_FORMAT_RAW: PromptFormat.RAW,
    pb.PROMPT_FORMAT_ALPACA: PromptFormat.ALPACA,
    pb.PROMPT_FORMAT_CHAT: PromptFormat.CHAT,
}
FORMAT_TO_PROTO = {v: k for k, v in _FORMATS.items() if v is not None}
_FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


def prompt_spec(message: pb.PromptInput) -> PromptSpec:
    if message.format not in _FORMATS:
        raise InvalidArgument(f"prompt.format {message.format} is not a known PromptFormat value")
    return PromptSpec(
        format=_FORMATS[message.format],
        text=message.text,
        input=message.input,
        messages=tuple((m.role, m.content) for m in message.messages),
        truncate_left_tokens=message.truncate_left_tokens
        if message.HasField("truncate_left_tokens")
        else None,
        token_ids=tuple(message.token_ids),
        add_special_tokens=message.add_special_tokens if message.HasField("add_special_tokens") else None,
        tools_json=message.tools_json,
    )


def sampling_params(message: pb.SamplingParams) -> SamplingParams:
    """Unset optional fields keep SamplingParams' defaults; validation happens there, once."""
    optional = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens",
                "min_new_tokens", "seed")  # fmt: skip
    values = {name: getattr(message, name) for name in optional if message.HasField(name)}
    if message.HasField("prompt_logprobs"):
        values["prompt_logprobs"] = message.prompt_logprobs
    if message.HasField("structured_output"):
        values["structured"] = structured_output(message.structured_output)
    return SamplingParams(
        **values,
        presence_penalty=message.presence_penalty,
        frequency_penalty=message.frequency_penalty,
        logit_bias=tuple(sorted(message.logit_bias.items())),
        stop=tuple(message.stop),
        stop_token_ids=tuple(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
        logprobs=message.logprobs or message.top_logprobs > 0,
        top_logprobs=message.top_logprobs,
    )


def structured_output(message: pb.StructuredOutput) -> StructuredOutput:
    kind = message.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("structured_output is set but names no structure (json_schema, json_object or "
                              "regex)", metadata={"field": "structured_output"})  # fmt: skip
    return StructuredOutput(kind, "" if kind == "json_object" else getattr(message, kind))


def logprobs(items: tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=item.token_id,
            logprob=item.logprob,
            text=item.text,
            top=[pb.TopLogprob(token_id=t.token_id, text=t.text, logprob=t.logprob) for t in item.top],
        )
        for item in items
    ]


def generate_response(events: list[StreamEvent]) -> pb.GenerateResponse:
    """One message for one or more consecutive events of a request (coalesced when the client lags)."""
    last = events[-1]
    message = pb.GenerateResponse(
        token_ids=[t for e in events for t in e.token_ids],
        text="".join(e.text for e in events),
        logprobs=logprobs(tuple(lp for e in events for lp in e.logprobs)),
        prompt_logprobs=logprobs(tuple(lp for e in events for lp in e.prompt_logprobs)),
    )
    if last.finish_reason is not None:
        _fill_final(message, last)
    return message


def complete_response(events: list[StreamEvent]) -> pb.CompleteResponse:
    message = pb.CompleteResponse(
        text="".join(e.text for e in events),
        token_ids=[t for e in events for t in e.token_ids],
        logprobs=logprobs(tuple(lp for e in events for lp in e.logprobs)),
        prompt_logprobs=logprobs(tuple(lp for e in events for lp in e.prompt_logprobs)),
    )
    _fill_final(message, events[-1])
    return message


def _fill_final(message, event: StreamEvent) -> None:
    message.finish_reason = _FINISH[event.finish_reason]
    if event.seed is not None:
        message.seed = event.seed
    if event.usage:
        message.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=event.usage.prompt_tokens,
                completion_tokens=event.usage.completion_tokens,
                truncated_prompt_tokens=event.usage.truncated_prompt_tokens,
            )
        )
    if event.timings:
        message.timings.CopyFrom(
            pb.Timings(
                queue_seconds=event.timings.queue_seconds,
                time_to_first_token_seconds=event.timings.time_to_first_token_seconds,
                total_seconds=event.timings.total_seconds,
            )
        )
