"""The OpenAI-compatible HTTP API (FastAPI), over the inference gRPC contract.

Every generation is one Generate stream to one replica; a non-streaming response collects it. The
gateway waits for the first message before answering, so a refused request (a bad parameter, a full
queue) gets its HTTP status instead of a 200 stream that breaks. If the chosen replica is unavailable or
full before it produced anything, the next replica is tried. When the HTTP client goes away, the gRPC
call is cancelled at once, and the replica drops the request from its batch before its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway import convert
from services.gateway.errors import OpenAIError, from_rpc_error
from services.gateway.metrics import GatewayMetrics
from services.gateway.replicas import Replica, ReplicaPool
from services.gateway.schema import ChatCompletionRequest, CompletionRequest
from wombat.inference.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


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

    app.add_middleware(_CountRequests, metrics=state.metrics)

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
        _admit(state, request)
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request) -> JSONResponse:
        _admit(state, request)
        _check_model(state, model_id)
        return JSONResponse(_model_card(state))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _admit(state, request)
        _check_request(state, body)
        params = convert.sampling(body, body.max_tokens)
        return await _generate(
            state, request, body, convert.completion_prompt(body), params, _CompletionShape()
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        _admit(state, request)
        _check_request(state, body)
        max_tokens = body.max_completion_tokens or body.max_tokens or state.default_max_tokens
        params = convert.sampling(body, max_tokens)
        prompt = convert.chat_prompt(body, state.info.default_prompt_format)
        return await _generate(state, request, body, prompt, params, _ChatShape())

    return app


class _CountRequests:
    """Counts every HTTP request by route and status, timed to the last byte. Plain ASGI: Starlette's
    BaseHTTPMiddleware would wrap `receive` and hide the client's disconnect from the routes."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models")

    def __init__(self, app, metrics: GatewayMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), 500
        path = scope["path"]
        route = next((r for r in self.ROUTES if path.startswith(r)), "other")

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.duration.labels(route).observe(time.monotonic() - started)


def _admit(state: GatewayState, request: Request) -> None:
    """The API key (constant-time comparison), then the lifecycle: 503 while loading or draining."""
    if state.api_key is not None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), state.api_key.encode()
        ):
            raise OpenAIError(401, "invalid API key: send it as 'Authorization: Bearer <key>'",
                              code="invalid_api_key")  # fmt: skip
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


async def _open(
    state: GatewayState, prompt: pb.PromptInput, params: pb.SamplingParams, request_id: str, fields: dict
) -> tuple[Replica, grpc.aio.UnaryStreamCall, pb.GenerateResponse]:
    """Starts the Generate stream on the best replica and reads its first message; fails over to the next
    replica while the one tried is unavailable or full (nothing was generated there)."""
    last_error: grpc.RpcError | None = None
    for replica in state.pool.candidates():
        client = replica.client
        call = client.stub.Generate(
            pb.GenerateRequest(prompt=prompt, sampling=params),
            timeout=client.timeout,
            metadata=client.settings.metadata(request_id),
        )
        replica.sent_since_poll += 1
        try:
            first = await call.read()
        except grpc.RpcError as exc:
            if exc.code() not in FAILOVER_CODES:
                raise from_rpc_error(exc, fields) from None
            last_error = exc
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                replica.up = False
            continue
        except BaseException:
            call.cancel()
            raise
        state.metrics.replica_requests.labels(replica.address).inc()
        return replica, call, first
    if last_error is not None:
        raise from_rpc_error(last_error, fields)
    raise OpenAIError(503, "no inference replica is up; retry shortly")


async def _cancel_on_disconnect(request: Request, call: grpc.aio.UnaryStreamCall) -> None:
    """Cancels the gRPC call the moment the HTTP client disconnects (uvicorn reports it on `receive`)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            call.cancel()
            return


async def _generate(state, request: Request, body, prompt, params, shape) -> Response:
    started = time.monotonic()
    route = request.url.path
    request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    fields = shape.field_names
    # Counted from arrival, so a drain also waits for requests still waiting for their first token.
    state.in_flight += 1
    try:
        replica, call, first = await _open(state, prompt, params, request_id, fields)
    except BaseException:
        state.in_flight -= 1
        raise
    state.metrics.ttft.labels(route).observe(time.monotonic() - started)
    replica.in_flight += 1
    watcher = asyncio.create_task(_cancel_on_disconnect(request, call))

    async def messages() -> AsyncIterator[pb.GenerateResponse]:
        try:
            message = first
            while message is not grpc.aio.EOF:
                yield message
                message = await call.read()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, fields) from None
        finally:
            watcher.cancel()
            call.cancel()  # a no-op after the stream ended; otherwise frees the replica's slot
            replica.in_flight -= 1
            state.in_flight -= 1

    identity = _Identity(f"{shape.prefix}-{request_id}", int(time.time()), state.model_name)
    headers = {REQUEST_ID_HEADER: request_id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _sse(shape.chunks(identity, messages(), include_usage))
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    async with contextlib.aclosing(messages()) as stream:
        return JSONResponse(await _collect(shape, identity, stream), headers=headers)


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them; an error after the stream began is an `error` event (the
    openai SDK raises it as APIError), then [DONE]."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except OpenAIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    yield "data: [DONE]\n\n"


@dataclass(frozen=True)
class _Identity:
    id: str
    created: int
    model: str

    def fields(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


async def _collect(shape, identity: _Identity, messages: AsyncIterator[pb.GenerateResponse]) -> dict:
    """A non-streaming response: the whole stream gathered, in the shape's object."""
    texts, logprobs, final = [], [], None
    async for message in messages:
        texts.append(message.text)
        logprobs.extend(message.logprobs)
        final = message
    return shape.whole(identity, "".join(texts), logprobs, final)


class _CompletionShape:
    """/v1/completions: `text_completion` objects, legacy logprobs."""

    prefix = "cmpl"
    # Contract field names (ErrorInfo "field") as a caller of this endpoint knows them.
    field_names = {**convert.OPENAI_FIELDS, "prompt": "prompt", "top_logprobs": "logprobs"}

    def whole(self, identity: _Identity, text: str, logprobs: list, final: pb.GenerateResponse) -> dict:
        choice = {"index": 0, "text": text, "finish_reason": convert.FINISH_REASONS[final.finish_reason],
                  "logprobs": convert.completion_logprobs(logprobs, 0) if logprobs else None}  # fmt: skip
        return {**identity.fields("text_completion"), "choices": [choice], "usage": convert.usage(final),
                "seed": final.seed}  # fmt: skip

    async def chunks(self, identity, messages, include_usage: bool) -> AsyncIterator[dict]:
        offset = 0
        async for message in messages:
            finished = message.finish_reason != pb.FINISH_REASON_UNSPECIFIED
            logprobs = convert.completion_logprobs(message.logprobs, offset) if message.logprobs else None
            offset += len(message.text)
            choice = {"index": 0, "text": message.text, "logprobs": logprobs,
                      "finish_reason": convert.FINISH_REASONS[message.finish_reason] if finished else None}  # fmt: skip
            chunk = {**identity.fields("text_completion"), "choices": [choice]}
            if finished:
                chunk["seed"] = message.seed
            yield chunk
            if finished and include_usage:
                yield {**identity.fields("text_completion"), "choices": [], "usage": convert.usage(message)}


class _ChatShape:
    """/v1/chat/completions: `chat.completion` objects and `chat.completion.chunk` deltas."""

    prefix = "chatcmpl"
    field_names = {**convert.OPENAI_FIELDS, "prompt": "messages", "top_logprobs": "top_logprobs"}

    def whole(self, identity: _Identity, text: str, logprobs: list, final: pb.GenerateResponse) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": convert.FINISH_REASONS[final.finish_reason],
                  "logprobs": convert.chat_logprobs(logprobs) if logprobs else None}  # fmt: skip
        return {**identity.fields("chat.completion"), "choices": [choice], "usage": convert.usage(final),
                "seed": final.seed}  # fmt: skip

    async def chunks(self, identity, messages, include_usage: bool) -> AsyncIterator[dict]:
        def chunk(delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return {**identity.fields("chat.completion.chunk"), "choices": [choice]}

        yield chunk({"role": "assistant", "content": ""})
        async for message in messages:
            finished = message.finish_reason != pb.FINISH_REASON_UNSPECIFIED
            logprobs = convert.chat_logprobs(message.logprobs) if message.logprobs else None
            if message.text or logprobs:
                yield chunk({"content": message.text}, logprobs=logprobs)
            if finished:
                yield {**chunk({}, convert.FINISH_REASONS[message.finish_reason]), "seed": message.seed}
                if include_usage:
                    yield {
                        **identity.fields("chat.completion.chunk"),
                        "choices": [],
                        "usage": convert.usage(message),
                    }
