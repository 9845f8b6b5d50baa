"""The OpenAI-compatible HTTP API (FastAPI), over the inference gRPC contract.

Routes: /v1/completions, /v1/chat/completions, /v1/models, vLLM's /tokenize and /detokenize, /health,
/metrics. The edge (edge.py) checks the API key and caps the body before anything is parsed; each
generation's choices are Generate streams fanned out over the replicas (generation.py) and shaped into
OpenAI's objects (shapes.py). Every error, before or during a stream, is OpenAI-shaped (errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway import convert
from services.gateway.edge import REQUEST_ID_HEADER, CountRequests, Edge, request_id
from services.gateway.errors import OpenAIError, from_rpc_error
from services.gateway.generation import (
    Choice,
    ChoiceSpec,
    Disconnect,
    Identity,
    choice_specs,
    gather,
    interleave,
    messages,
    open_choices,
    sse,
    usage_of,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.replicas import ReplicaPool
from services.gateway.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from services.gateway.shapes import ChatShape, CompletionShape, chunk, response, usage_chunk
from wombat.inference.v1 import inference_pb2 as pb
from wombat_core.engine.prompting import declares_tools

log = logging.getLogger(__name__)


@dataclass
class GatewayState:
    """What the routes share: the replicas, the served model, and the lifecycle flags."""

    pool: ReplicaPool
    metrics: GatewayMetrics
    registry: CollectorRegistry
    api_key: str | None = None
    served_model_name: str | None = None  # None: the replicas' model name
    default_max_tokens: int = 512  # chat requests without max_tokens
    info: pb.ModelInfoResponse | None = None  # set when a replica first answered
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    in_flight: int = 0
    max_body_bytes: int = 8 * 1024 * 1024

    @property
    def ready(self) -> bool:
        return self.info is not None and not self.draining

    @property
    def model_name(self) -> str:
        return self.served_model_name or (self.info.name if self.info else "")


def create_app(state: GatewayState) -> FastAPI:
    app = FastAPI(title="Wombat OpenAI-compatible gateway", docs_url=None, redoc_url=None)
    app.state.gateway = state
    # Read from the gateway's own state at scrape time, so there is nothing to keep in step.
    state.metrics.in_flight.set_function(lambda: state.in_flight)
    state.metrics.replicas_up.set_function(lambda: state.pool.replicas_up)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0] if exc.errors() else {}
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        param = location[0] if location else None
        where = ".".join(location) or "the body"
        return OpenAIError(400, f"{where}: {error.get('msg', 'invalid value')}", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return OpenAIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s", request.url.path)
        return OpenAIError(
            500, "internal error in the gateway; its log has the details", kind="api_error"
        ).response()

    # Outermost last: requests are counted (401 and 413 included), then the edge refuses what it must.
    app.add_middleware(Edge, api_key=state.api_key, max_body_bytes=state.max_body_bytes)
    app.add_middleware(CountRequests, metrics=state.metrics)

    @app.get("/health")
    async def health() -> Response:
        """200 when at least one replica answers and the gateway is not draining (Kubernetes probes)."""
        if state.draining:
            return OpenAIError(503, "the gateway is shutting down").response()
        if not state.ready or not state.pool.any_up:
            return OpenAIError(503, "no inference replica is ready yet").response()
        return JSONResponse({"status": "ok", "replicas_up": state.pool.replicas_up})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _admit(state)
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request) -> JSONResponse:
        _admit(state)
        _check_model(state, model_id)
        return JSONResponse(_model_card(state))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _admit(state)
        _check_request(state, body)
        shape = CompletionShape(body)
        prompts = body.prompts()
        texts = await _prompt_texts(state, prompts) if body.echo else None
        specs = choice_specs([convert.completion_prompt(p, body) for p in prompts],
                             convert.sampling(body, body.new_tokens), body.choices_per_prompt, texts)  # fmt: skip
        return await _generate(state, request, body, specs, shape)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        _admit(state)
        _check_request(state, body)
        max_tokens = body.max_completion_tokens or body.max_tokens or state.default_max_tokens
        template_tools = (state.info.default_prompt_format != pb.PROMPT_FORMAT_ALPACA
                          and declares_tools(state.info.chat_template))  # fmt: skip
        if body.may_call_tools and not template_tools:
            raise OpenAIError(400, 'tool_choice "auto" (the default with tools) needs a model whose chat template '
                                   "declares tool use, and this model's does not; send tool_choice \"required\" or "
                                   '{"type": "function", "function": {"name": ...}}: the output is then constrained '
                                   "to the tools' schemas", "tool_choice")  # fmt: skip
        prompt = convert.chat_prompt(body, state.info.default_prompt_format, with_tools=template_tools)
        specs = choice_specs([prompt], convert.sampling(body, max_tokens), body.choices_per_prompt)
        return await _generate(state, request, body, specs, ChatShape(body))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
        """vLLM's /tokenize: a prompt rendered as /v1/completions renders it, or messages as chat does."""
        _admit(state)
        if body.model is not None:
            _check_model(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError(400, "send either prompt or messages", "prompt")
        if body.prompt is not None:
            prompt = pb.PromptInput(format=pb.PROMPT_FORMAT_RAW, text=body.prompt)
            if body.add_special_tokens is not None:
                prompt.add_special_tokens = body.add_special_tokens
        else:
            if body.add_generation_prompt is False:
                raise OpenAIError(400, "add_generation_prompt: false is not supported: the chat template "
                                       "always ends with the generation prompt", "add_generation_prompt")  # fmt: skip
            prompt = convert.chat_prompt(body, state.info.default_prompt_format)
        tokenized = await _unary(
            state, lambda client: client.tokenize(prompt, request_id=request_id(request.headers))
        )
        result = {"count": len(tokenized.token_ids), "max_model_len": state.info.context_length,
                  "tokens": list(tokenized.token_ids)}  # fmt: skip
        if body.return_token_strs:
            result["token_strs"] = list(tokenized.tokens)
        return JSONResponse(result)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        """vLLM's /tokenizer_info (what lm-eval's remote tokenizer reads): the special tokens and template."""
        _admit(state)
        info = state.info
        return JSONResponse({"eos_token": info.eos_token or None, "bos_token": info.bos_token or None,
                             "pad_token": info.pad_token or None, "chat_template": info.chat_template or None,
                             "model_max_length": info.context_length, "vocab_size": info.vocab_size})  # fmt: skip

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
        _admit(state)
        if body.model is not None:
            _check_model(state, body.model)
        text = await _unary(
            state, lambda client: client.detokenize(body.tokens, request_id=request_id(request.headers))
        )
        return JSONResponse({"prompt": text.text})

    return app


def _admit(state: GatewayState) -> None:
    """The lifecycle: 503 while loading or draining (the API key was checked at the edge)."""
    if state.draining:
        raise OpenAIError(503, "the gateway is shutting down; retry (another gateway replica will answer)")
    if state.info is None:
        raise OpenAIError(503, "no inference replica has answered yet; retry shortly")


def _check_model(state: GatewayState, model: str) -> None:
    if model != state.model_name:
        raise OpenAIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                          "model", code="model_not_found")  # fmt: skip


def _check_request(state: GatewayState, body: CompletionRequest | ChatCompletionRequest) -> None:
    _check_model(state, body.model)
    unsupported = body.unsupported()
    if unsupported is not None:
        raise OpenAIError(400, unsupported[1], unsupported[0])


def _model_card(state: GatewayState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "wombat",
            "max_model_len": state.info.context_length}  # fmt: skip


# --- generation --------------------------------------------------------------------------------------


async def _unary(state: GatewayState, call):
    """A unary RPC (Tokenize, Detokenize) on the best replica that is up."""
    candidates = state.pool.candidates()
    if not candidates:
        raise OpenAIError(503, "no inference replica is up; retry shortly")
    try:
        return await call(candidates[0].client)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, {"token_ids": "tokens"}) from None


async def _prompt_texts(state: GatewayState, prompts: list) -> list[str]:
    """The text echo prepends for each prompt: a string as given, token ids decoded by a replica (the
    Detokenize calls of a batch run together)."""

    async def text(prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return (await _unary(state, lambda client: client.detokenize(prompt))).text

    return list(await asyncio.gather(*(text(p) for p in prompts)))


async def _generate(state: GatewayState, request: Request, body, specs: list[ChoiceSpec], shape) -> Response:
    started = time.monotonic()
    route = request.url.path
    rid = request_id(request.headers)
    fields, n = shape.field_names, body.choices_per_prompt
    # Counted from arrival, so a drain also waits for requests still waiting for their first token.
    state.in_flight += 1
    disconnect = Disconnect(request)
    try:
        choices = await open_choices(state.pool, specs, rid, fields, disconnect)
    except BaseException:
        state.in_flight -= 1
        disconnect.close()
        raise
    state.metrics.ttft.labels(route).observe(time.monotonic() - started)
    for choice in choices:
        state.metrics.replica_requests.labels(choice.replica.upstream).inc()
    identity = Identity(f"{shape.prefix}-{rid}", int(time.time()), state.model_name)
    headers = {REQUEST_ID_HEADER: rid}

    def done() -> None:
        state.in_flight -= 1
        disconnect.close()

    if body.streaming:
        return StreamingResponse(sse(_chunks(state, identity, shape, choices, fields, n, body.include_usage, done)),
                                 media_type="text/event-stream", headers=headers)  # fmt: skip
    try:
        outcomes = await asyncio.gather(*(gather(state.pool, choice, fields) for choice in choices))
    finally:
        for choice in choices:  # a failed sibling: the others' calls are cancelled and their slots freed
            choice.call.cancel()
        done()
    whole = [shape.whole(choice.spec, outcome) for choice, outcome in zip(choices, outcomes, strict=True)]
    usage = usage_of(specs, [o.final for o in outcomes], n)
    return JSONResponse(response(identity, shape, whole, usage), headers=headers)


async def _chunks(state: GatewayState, identity: Identity, shape, choices: list[Choice], fields: dict, n: int,
                  include_usage: bool, done) -> AsyncIterator[dict]:  # fmt: skip
    finals: dict[int, pb.GenerateResponse] = {}

    async def one(choice: Choice) -> AsyncIterator[dict]:
        async def noted() -> AsyncIterator[pb.GenerateResponse]:
            async for message in messages(state.pool, choice, fields):
                if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    finals[choice.spec.index] = message
                yield message

        async with contextlib.aclosing(shape.chunks(choice.spec, noted())) as stream:
            async for item in stream:
                yield chunk(identity, shape, item)

    try:
        async for item in interleave([one(choice) for choice in choices]):
            yield item
        if include_usage:
            specs = [c.spec for c in choices]
            yield usage_chunk(identity, shape, usage_of(specs, [finals[s.index] for s in specs], n))
    finally:
        for choice in choices:
            choice.call.cancel()
        done()
