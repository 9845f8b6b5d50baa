"""Sync and asyncio clients for the inference service.

Generation is never retried automatically: a retry after tokens were streamed would duplicate output.
Tokenize and ModelInfo are idempotent and retried on UNAVAILABLE (for example while a replica warms up).
Every call takes a deadline (`timeout`, seconds); the server stops generating when it passes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence

from clients.channel import ChannelSettings, call_metadata, open_aio_channel, open_channel
from wombat.inference.v1 import inference_pb2 as pb
from wombat.inference.v1 import inference_pb2_grpc

_SERVICE = "wombat.inference.v1.InferenceService"
RETRY_IDEMPOTENT = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": _SERVICE, "method": m} for m in ("Tokenize", "ModelInfo")],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
FORMATS = {"raw": pb.PROMPT_FORMAT_RAW, "alpaca": pb.PROMPT_FORMAT_ALPACA, "chat": pb.PROMPT_FORMAT_CHAT}


def prompt(
    text: str = "",
    *,
    format: str | None = None,  # noqa: A002 - mirrors the proto field
    input: str = "",  # noqa: A002
    messages: Sequence[tuple[str, str]] = (),
    truncate_left_tokens: int | None = None,
) -> pb.PromptInput:
    """Builds a PromptInput; format None uses the server's default (alpaca for Wombat models)."""
    message = pb.PromptInput(
        format=FORMATS[format] if format else pb.PROMPT_FORMAT_UNSPECIFIED,
        text=text,
        input=input,
        messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
    )
    if truncate_left_tokens is not None:
        message.truncate_left_tokens = truncate_left_tokens
    return message


def sampling(**fields) -> pb.SamplingParams:
    """SamplingParams from keyword arguments, e.g. sampling(temperature=0, max_new_tokens=64, stop=["\\n"])."""
    return pb.SamplingParams(**fields)


class InferenceClient:
    def __init__(self, settings: ChannelSettings | str, *, timeout: float | None = 120.0):
        self.settings = ChannelSettings(settings) if isinstance(settings, str) else settings
        self._channel = open_channel(self.settings, RETRY_IDEMPOTENT)
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self.timeout = timeout

    def generate(
        self, prompt_input: pb.PromptInput, params: pb.SamplingParams | None = None
    ) -> Iterator[pb.GenerateResponse]:
        """Streams responses; call `.cancel()` on the returned iterator to stop generation early."""
        request = pb.GenerateRequest(prompt=prompt_input, sampling=params)
        return self._stub.Generate(request, timeout=self.timeout, metadata=call_metadata(self.settings))

    def complete(
        self, prompt_input: pb.PromptInput, params: pb.SamplingParams | None = None
    ) -> pb.CompleteResponse:
        request = pb.CompleteRequest(prompt=prompt_input, sampling=params)
        return self._stub.Complete(request, timeout=self.timeout, metadata=call_metadata(self.settings))

    def tokenize(self, prompt_input: pb.PromptInput) -> pb.TokenizeResponse:
        request = pb.TokenizeRequest(prompt=prompt_input)
        return self._stub.Tokenize(request, timeout=self.timeout, metadata=call_metadata(self.settings))

    def model_info(self) -> pb.ModelInfoResponse:
        return self._stub.ModelInfo(
            pb.ModelInfoRequest(), timeout=self.timeout, metadata=call_metadata(self.settings)
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncInferenceClient:
    """The same API on grpc.aio, for asyncio backends."""

    def __init__(self, settings: ChannelSettings | str, *, timeout: float | None = 120.0):
        self.settings = ChannelSettings(settings) if isinstance(settings, str) else settings
        self._channel = open_aio_channel(self.settings, RETRY_IDEMPOTENT)
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self.timeout = timeout

    def generate(
        self, prompt_input: pb.PromptInput, params: pb.SamplingParams | None = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        request = pb.GenerateRequest(prompt=prompt_input, sampling=params)
        return self._stub.Generate(request, timeout=self.timeout, metadata=call_metadata(self.settings))

    async def complete(
        self, prompt_input: pb.PromptInput, params: pb.SamplingParams | None = None
    ) -> pb.CompleteResponse:
        request = pb.CompleteRequest(prompt=prompt_input, sampling=params)
        return await self._stub.Complete(request, timeout=self.timeout, metadata=call_metadata(self.settings))

    async def tokenize(self, prompt_input: pb.PromptInput) -> pb.TokenizeResponse:
        request = pb.TokenizeRequest(prompt=prompt_input)
        return await self._stub.Tokenize(request, timeout=self.timeout, metadata=call_metadata(self.settings))

    async def model_info(self) -> pb.ModelInfoResponse:
        request = pb.ModelInfoRequest()
        return await self._stub.ModelInfo(
            request, timeout=self.timeout, metadata=call_metadata(self.settings)
        )

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
