"""InferenceService: renders and tokenises prompts, submits them to the engine backend, streams tokens back.

Everything here is the same for both backends (wombat_core/engine/backend.py): templating, tokenisation,
validation, truncation, metrics. Tokenisation runs in a worker thread, off the event loop: a long prompt
takes milliseconds to tokenise, and every stream of the replica would stall meanwhile. When the client
cancels or its deadline passes, the handler is cancelled and the backend drops the request within a step.
When a client reads slower than tokens arrive, pending events are coalesced into one message, so a slow
reader never slows the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

from services.inference import convert
from services.inference.metrics import InferenceMetrics
from services.scaffold.logs import request_id_var
from wombat.inference.v1 import inference_pb2 as pb
from wombat.inference.v1 import inference_pb2_grpc
from wombat_core.engine import GenerationRequest
from wombat_core.engine.backend import EngineBackend
from wombat_core.engine.prompting import EncodedPrompt, PromptFormat, decode, encode
from wombat_core.engine.types import StreamEvent
from wombat_core.errors import Unavailable


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, default_format: PromptFormat):
        self.default_format = default_format
        self.backend: EngineBackend | None = None
        self.metrics: InferenceMetrics | None = None
        self._ids = itertools.count()

    def attach(self, backend: EngineBackend) -> None:
        self.backend = backend
        if self.metrics is not None:
            self.metrics.watch(backend)

    def _ready(self) -> EngineBackend:
        if self.backend is None:
            raise Unavailable(
                "the model is still loading; retry shortly (the health check says when it is ready)"
            )
        return self.backend

    async def _encode(self, backend: EngineBackend, message: pb.PromptInput) -> EncodedPrompt:
        spec = convert.prompt_spec(message)
        return await asyncio.to_thread(encode, spec, backend.tokenizer, self.default_format)

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        async for events in self._run(request.prompt, request.sampling):
            yield convert.generate_response(events)

    async def Complete(self, request: pb.CompleteRequest, context) -> pb.CompleteResponse:
        collected: list[StreamEvent] = []
        async for events in self._run(request.prompt, request.sampling):
            collected.extend(events)
        return convert.complete_response(collected)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        backend = self._ready()
        encoded = await self._encode(backend, request.prompt)
        tokens = backend.tokenizer.convert_ids_to_tokens(list(encoded.token_ids))
        return pb.TokenizeResponse(rendered=encoded.rendered, token_ids=encoded.token_ids, tokens=tokens)

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        backend = self._ready()
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = await asyncio.to_thread(decode, tuple(request.token_ids), backend.tokenizer, backend.facts.vocab_size,
                                       skip_special_tokens=skip)  # fmt: skip
        return pb.DetokenizeResponse(text=text)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        backend = self._ready()
        facts, tokenizer = backend.facts, backend.tokenizer
        return pb.ModelInfoResponse(
            name=facts.name,
            model_type=facts.model_type,
            context_length=facts.context_length,
            vocab_size=facts.vocab_size,
            dtype=facts.dtype,
            device=facts.device,
            default_prompt_format=convert.FORMAT_TO_PROTO[self.default_format],
            eos_token_id=facts.eos_token_ids[0] if facts.eos_token_ids else -1,
            max_batch_size=facts.max_batch_size,
            eos_token_ids=facts.eos_token_ids,
            eos_token=tokenizer.eos_token or "",
            bos_token=tokenizer.bos_token or "",
            pad_token=tokenizer.pad_token or "",
            chat_template=getattr(tokenizer, "chat_template", None) or "",
        )

    async def GetLoad(self, request: pb.GetLoadRequest, context) -> pb.GetLoadResponse:
        backend = self._ready()
        stats = backend.stats()
        return pb.GetLoadResponse(
            waiting_requests=stats.waiting,
            running_requests=stats.in_batch,
            max_batch_size=backend.facts.max_batch_size,
            max_waiting_requests=backend.facts.max_queue,
            kv_cache_usage=stats.kv_cache_usage,
        )

    async def _run(
        self, prompt: pb.PromptInput, sampling: pb.SamplingParams
    ) -> AsyncIterator[list[StreamEvent]]:
        """Submits one request; yields lists of its events (coalesced), the last list ending it."""
        backend = self._ready()
        params = convert.sampling_params(sampling)
        encoded = await self._encode(backend, prompt)
        request = GenerationRequest(
            f"{request_id_var.get()}-{next(self._ids)}", encoded.token_ids, params, encoded.truncated_tokens
        )
        started, previous = time.monotonic(), None
        # aclosing: when this call is cancelled (disconnect, deadline) the backend drops the request at once.
        async with contextlib.aclosing(backend.generate(request)) as stream:
            async for events in stream:
                previous = self._observe(events, started, previous)
                yield events

    def _observe(self, events: list[StreamEvent], started: float, previous: float | None) -> float | None:
        """Token metrics, timed by when the engine made each token, so a reader that lags (and gets several
        tokens in one message) changes nothing: one TTFT per request, one inter-token interval per later
        token. Finish reasons are counted by the backend's on_finish hook."""
        if self.metrics is None:
            return previous
        for event in events:
            if not event.token_ids:
                continue
            self.metrics.generated_tokens.inc(len(event.token_ids))
            if previous is None:
                self.metrics.ttft.observe(event.emitted_at - started)
            else:
                self.metrics.inter_token.observe(event.emitted_at - previous)
            previous = event.emitted_at
        return previous
