"""Generation requests: one Generate stream per choice, fanned out over the replicas, and the OpenAI objects
they become.

A request holds choices: n for each prompt (a completions request may batch prompts), indexed prompt-major
as vLLM does (prompt p's choice j is index p * n + j). Each is its own Generate call, opened in parallel;
the gateway reads each call's first message before answering, so a refused request (a bad parameter, a
full queue) gets its HTTP status instead of a 200 stream that breaks. While a replica is unavailable or
full before it produced anything, the next one is tried; if any choice cannot be opened, the others are
cancelled and the error is the answer. A streamed response interleaves the choices' chunks as they come,
each with its index. Usage counts each prompt once and every choice's output.

A `Disconnect` watches the HTTP client from the request's arrival: when it goes away (even while the
request is still queued on a replica), every call is cancelled at once, and the replicas drop the request
from their queue or batch before their next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from starlette.requests import Request

from services.gateway import convert
from services.gateway.errors import OpenAIError, from_rpc_error, worth_another_replica
from services.gateway.replicas import Replica, ReplicaPool
from wombat.inference.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)


class Disconnect:
    """Cancels the request's gRPC calls the moment the HTTP client disconnects (uvicorn reports it on
    `receive`), from arrival on; calls opened after that are cancelled as they open."""

    def __init__(self, request: Request):
        self.calls: list[grpc.aio.UnaryStreamCall] = []
        self.gone = False
        self._task = asyncio.create_task(self._watch(request))

    async def _watch(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        for call in self.calls:
            call.cancel()

    def track(self, call: grpc.aio.UnaryStreamCall) -> None:
        self.calls.append(call)
        if self.gone:
            call.cancel()

    def close(self) -> None:
        self._task.cancel()


@dataclass
class ChoiceSpec:
    """What one choice asks of a replica."""

    index: int
    prompt: pb.PromptInput
    params: pb.SamplingParams
    prompt_text: str | None = None  # for echo: the prompt's text, prepended to the output


@dataclass
class Choice:
    spec: ChoiceSpec
    replica: Replica
    call: grpc.aio.UnaryStreamCall
    first: pb.GenerateResponse


@dataclass
class Outcome:
    """A choice gathered whole (non-streaming)."""

    text: str = ""
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    final: pb.GenerateResponse | None = None


def choice_specs(prompts: list[pb.PromptInput], params: pb.SamplingParams, n: int,
                 prompt_texts: list[str | None] | None = None) -> list[ChoiceSpec]:  # fmt: skip
    """n choices per prompt, prompt-major. Several choices of an unseeded request share a seed the gateway
    draws, so that the response's `seed` reproduces every choice (choice i uses seed + i)."""
    if len(prompts) * n > 1 and not params.HasField("seed"):
        seeded = pb.SamplingParams()
        seeded.CopyFrom(params)
        seeded.seed = secrets.randbits(63)
        params = seeded
    texts = prompt_texts or [None] * len(prompts)
    return [
        ChoiceSpec(p * n + j, prompt, convert.for_choice(params, p * n + j), texts[p])
        for p, prompt in enumerate(prompts)
        for j in range(n)
    ]


async def open_choices(pool: ReplicaPool, specs: list[ChoiceSpec], request_id: str, fields: dict,
                       disconnect: Disconnect) -> list[Choice]:  # fmt: skip
    """Opens every choice in parallel; if one fails, the opened ones are cancelled and its error raised."""
    results = await asyncio.gather(
        *(_open(pool, spec, f"{request_id}-{spec.index}" if len(specs) > 1 else request_id, fields, disconnect)
          for spec in specs),
        return_exceptions=True,
    )  # fmt: skip
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        for result in results:
            if isinstance(result, Choice):
                result.call.cancel()
                pool.finished(result.replica)
        raise failures[0]
    return list(results)


async def _open(
    pool: ReplicaPool, spec: ChoiceSpec, request_id: str, fields: dict, disconnect: Disconnect
) -> Choice:
    """Starts the Generate stream on the best replica and reads its first message; fails over to the next
    replica while the one tried is unavailable or full (nothing was generated there)."""
    last_error: grpc.RpcError | None = None
    for replica in pool.candidates():
        call = replica.client.generate(spec.prompt, spec.params, request_id=request_id)
        disconnect.track(call)
        pool.dispatched(replica)
        try:
            first = await call.read()
        except grpc.RpcError as exc:
            if disconnect.gone:
                raise OpenAIError(499, "the client went away") from None
            if not worth_another_replica(exc):
                raise from_rpc_error(exc, fields) from None
            last_error = exc
            pool.refused(replica, exc.code())
            continue
        except BaseException:
            call.cancel()
            raise
        if first is grpc.aio.EOF:
            raise OpenAIError(502, "an inference replica ended the stream without a message")
        pool.started(replica)
        return Choice(spec, replica, call, first)
    if last_error is not None:
        raise from_rpc_error(last_error, fields)
    raise OpenAIError(503, "no inference replica is up; retry shortly")


async def messages(pool: ReplicaPool, choice: Choice, fields: dict) -> AsyncIterator[pb.GenerateResponse]:
    """The choice's messages, its first included; the replica's slot is freed however the reading ends."""
    try:
        message = choice.first
        while message is not grpc.aio.EOF:
            if message.finish_reason == pb.FINISH_REASON_CANCELLED:
                raise OpenAIError(504, "the inference replica cancelled the request before it finished (its "
                                       "deadline passed); retry, or ask for fewer tokens")  # fmt: skip
            yield message
            message = await choice.call.read()
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, fields) from None
    finally:
        choice.call.cancel()  # a no-op after the stream ended; otherwise frees the replica's slot
        pool.finished(choice.replica)


async def gather(pool: ReplicaPool, choice: Choice, fields: dict) -> Outcome:
    outcome, texts = Outcome(), []
    async with contextlib.aclosing(messages(pool, choice, fields)) as stream:
        async for message in stream:
            texts.append(message.text)
            outcome.logprobs.extend(message.logprobs)
            outcome.prompt_logprobs.extend(message.prompt_logprobs)
            outcome.final = message
    outcome.text = "".join(texts)
    return outcome


def usage_of(specs: list[ChoiceSpec], finals: list[pb.GenerateResponse], n: int) -> dict:
    """Each prompt's tokens once (its first choice's count), every choice's output."""
    prompt = sum(
        final.usage.prompt_tokens for spec, final in zip(specs, finals, strict=True) if spec.index % n == 0
    )
    return convert.usage(prompt, sum(final.usage.completion_tokens for final in finals))


async def interleave(streams: list[AsyncIterator[dict]]) -> AsyncIterator[dict]:
    """Items of several async iterators as they come; the first failure cancels the rest and is raised."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[dict]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    await queue.put(item)
            await queue.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them. Any failure after the stream began is an `error` event
    (the openai SDK raises it as APIError), then [DONE]: a stream never just stops."""
    try:
        # aclosing: when the client goes, the chunks' generator is closed at once and its calls cancelled.
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except OpenAIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    except Exception:  # noqa: BLE001 - logged; the caller gets an error event, not a cut stream
        log.exception("a streamed response failed")
        error = OpenAIError(500, "internal error in the gateway while streaming; its log has the details")
        yield f"data: {json.dumps(error.body())}\n\n"
    yield "data: [DONE]\n\n"


@dataclass(frozen=True)
class Identity:
    id: str
    created: int
    model: str

    def fields(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}
