"""InferenceService: renders and tokenises prompts, submits them to the engine, streams tokens back.

The engine runs on its own thread; its events reach this event loop through `Engine.generate_async`. When
the client cancels or its deadline passes, the handler is cancelled and the request is removed from the
batch before the next decode step. When a client reads slower than tokens arrive, pending events are
coalesced into one message, so a slow reader never slows the batch.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import AsyncIterator

from services.inference import convert
from services.inference.metrics import InferenceMetrics
from services.scaffold.logs import request_id_var
from wombat.inference.v1 import inference_pb2 as pb
from wombat.inference.v1 import inference_pb2_grpc
from wombat_core.engine import Engine, GenerationRequest
from wombat_core.engine.loading import LoadedModel
from wombat_core.engine.prompting import PromptFormat, encode
from wombat_core.engine.types import StreamEvent
from wombat_core.errors import Unavailable


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, default_format: PromptFormat, max_batch_size: int, max_queue: int):
        self.default_format = default_format
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.loaded: LoadedModel | None = None
        self.engine: Engine | None = None
        self.metrics: InferenceMetrics | None = None
        self._ids = itertools.count()

    def attach(self, loaded: LoadedModel, engine: Engine) -> None:
        self.loaded, self.engine = loaded, engine
        if self.metrics is not None:
            self.metrics.watch(engine)

    def _ready(self) -> tuple[LoadedModel, Engine]:
        if self.loaded is None or self.engine is None:
            raise Unavailable(
                "the model is still loading; retry shortly (the health check says when it is ready)"
            )
        return self.loaded, self.engine

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        async for events in self._run(request.prompt, request.sampling):
            yield convert.generate_response(events)

    async def Complete(self, request: pb.CompleteRequest, context) -> pb.CompleteResponse:
        collected: list[StreamEvent] = []
        async for events in self._run(request.prompt, request.sampling):
            collected.extend(events)
        return convert.complete_response(collected)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        loaded, _ = self._ready()
        encoded = encode(convert.prompt_spec(request.prompt), loaded.tokenizer, self.default_format)
        tokens = loaded.tokenizer.convert_ids_to_tokens(list(encoded.token_ids))
        return pb.TokenizeResponse(rendered=encoded.rendered, token_ids=encoded.token_ids, tokens=tokens)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        loaded, engine = self._ready()
        return pb.ModelInfoResponse(
            name=loaded.name,
            model_type=loaded.model_type,
            context_length=loaded.context_length,
            vocab_size=engine.vocab_size,
            dtype=loaded.dtype,
            device=loaded.device,
            default_prompt_format=convert.FORMAT_TO_PROTO[self.default_format],
            eos_token_id=engine.eos_token_ids[0] if engine.eos_token_ids else -1,
            max_batch_size=self.max_batch_size,
            eos_token_ids=engine.eos_token_ids,
        )

    async def GetLoad(self, request: pb.GetLoadRequest, context) -> pb.GetLoadResponse:
        _, engine = self._ready()
        stats = engine.stats()
        return pb.GetLoadResponse(
            waiting_requests=stats.waiting,
            running_requests=stats.in_batch,
            max_batch_size=self.max_batch_size,
            max_waiting_requests=self.max_queue,
            kv_cache_usage=stats.kv_cache_usage,
        )

    async def _run(
        self, prompt: pb.PromptInput, sampling: pb.SamplingParams
    ) -> AsyncIterator[list[StreamEvent]]:
        """Submits one request; yields lists of its events (coalesced), the last list ending it."""
        loaded, engine = self._ready()
        encoded = encode(convert.prompt_spec(prompt), loaded.tokenizer, self.default_format)
        params = convert.sampling_params(sampling)
        request = GenerationRequest(
            f"{request_id_var.get()}-{next(self._ids)}", encoded.token_ids, params, encoded.truncated_tokens
        )
        started, previous = time.monotonic(), None
        # aclosing: when this call is cancelled (disconnect, deadline) the engine drops the request at once.
        async with contextlib.aclosing(engine.generate_async(request)) as stream:
            async for events in stream:
                previous = self._observe(events, started, previous)
                yield events

    def _observe(self, events: list[StreamEvent], started: float, previous: float | None) -> float | None:
        """Token metrics, timed by when the engine made each token, so a reader that lags (and gets several
        tokens in one message) changes nothing: one TTFT per request, one inter-token interval per later
        token. Finish reasons are counted by the engine itself."""
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
