"""Sync and asyncio clients for the inference service.

Generation is never retried automatically: a retry after tokens were streamed would duplicate output.
Tokenize, Detokenize, ModelInfo and GetLoad are idempotent and retried on UNAVAILABLE (for example while a replica warms up).
Every call takes a deadline (`timeout`, seconds); the server stops generating when it passes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc

from clients.base import AsyncServiceClient, ServiceClient
from wombat.inference.v1 import inference_pb2 as pb
from wombat.inference.v1 import inference_pb2_grpc

FORMATS = {"raw": pb.PROMPT_FORMAT_RAW, "alpaca": pb.PROMPT_FORMAT_ALPACA, "chat": pb.PROMPT_FORMAT_CHAT}


def prompt(
    text: str = "",
    *,
    format: str | None = None,  # noqa: A002 - mirrors the proto field
    input: str = "",  # noqa: A002
    messages: Sequence[tuple[str, str]] = (),
    truncate_left_tokens: int | None = None,
    token_ids: Sequence[int] = (),
) -> pb.PromptInput:
    """Builds a PromptInput; format None uses the server's default (alpaca for Wombat models). A prompt of
    `token_ids` is used as it is, without template or tokenisation."""
    message = pb.PromptInput(
        format=FORMATS[format] if format else pb.PROMPT_FORMAT_UNSPECIFIED,
        text=text,
        input=input,
        messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
        token_ids=token_ids,
    )
    if truncate_left_tokens is not None:
        message.truncate_left_tokens = truncate_left_tokens
    return message


def sampling(**fields) -> pb.SamplingParams:
    """SamplingParams from keyword arguments, e.g. sampling(temperature=0, max_new_tokens=64, stop=["\\n"])."""
    return pb.SamplingParams(**fields)


class InferenceClient(ServiceClient):
    SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
    STUB = inference_pb2_grpc.InferenceServiceStub
    RETRYABLE = ("Tokenize", "Detokenize", "ModelInfo", "GetLoad")

    def generate(
        self,
        prompt_input: pb.PromptInput,
        params: pb.SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> Iterator[pb.GenerateResponse]:
        """Streams responses; call `.cancel()` on the returned iterator to stop generation early."""
        return self.stub.Generate(
            pb.GenerateRequest(prompt=prompt_input, sampling=params), **self._call(request_id=request_id)
        )

    def complete(
        self, prompt_input: pb.PromptInput, params: pb.SamplingParams | None = None
    ) -> pb.CompleteResponse:
        return self.stub.Complete(pb.CompleteRequest(prompt=prompt_input, sampling=params), **self._call())

    def tokenize(self, prompt_input: pb.PromptInput) -> pb.TokenizeResponse:
        return self.stub.Tokenize(pb.TokenizeRequest(prompt=prompt_input), **self._call())

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> pb.DetokenizeResponse:
        request = pb.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return self.stub.Detokenize(request, **self._call())

    def model_info(self, timeout: float | None = None) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), **self._call(timeout))

    def get_load(self, timeout: float | None = None) -> pb.GetLoadResponse:
        return self.stub.GetLoad(pb.GetLoadRequest(), **self._call(timeout))


class AsyncInferenceClient(AsyncServiceClient):
    """The same API on grpc.aio, for asyncio backends."""

    SERVICE, STUB, RETRYABLE = InferenceClient.SERVICE, InferenceClient.STUB, InferenceClient.RETRYABLE

    def generate(
        self,
        prompt_input: pb.PromptInput,
        params: pb.SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> grpc.aio.UnaryStreamCall:
        """The Generate call: iterate it, or `await call.read()` message by message; `call.cancel()` stops
        generation on the replica."""
        return self.stub.Generate(
            pb.GenerateRequest(prompt=prompt_input, sampling=params), **self._call(request_id=request_id)
        )

    async def complete(
        self, prompt_input: pb.PromptInput, params: pb.SamplingParams | None = None
    ) -> pb.CompleteResponse:
        return await self.stub.Complete(
            pb.CompleteRequest(prompt=prompt_input, sampling=params), **self._call()
        )

    async def tokenize(
        self, prompt_input: pb.PromptInput, *, request_id: str | None = None
    ) -> pb.TokenizeResponse:
        return await self.stub.Tokenize(
            pb.TokenizeRequest(prompt=prompt_input), **self._call(request_id=request_id)
        )

    async def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True, *,
                         request_id: str | None = None) -> pb.DetokenizeResponse:  # fmt: skip
        request = pb.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return await self.stub.Detokenize(request, **self._call(request_id=request_id))

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfoResponse:
        return await self.stub.ModelInfo(pb.ModelInfoRequest(), **self._call(timeout))

    async def get_load(self, timeout: float | None = None) -> pb.GetLoadResponse:
        return await self.stub.GetLoad(pb.GetLoadRequest(), **self._call(timeout))
