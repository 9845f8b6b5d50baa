"""One server interceptor for every cross-cutting concern of a call.

For each RPC it: assigns a request id (from `x-request-id` or a new one) and echoes it in the initial
metadata; checks the bearer token (health and reflection stay open so probes and tooling work); counts
the call in Prometheus by method and status code; and turns core errors into their gRPC status, so
servicers just raise. Unexpected exceptions become INTERNAL with the request id, never a stack trace.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.scaffold.errors import rich_status, status_code_for
from services.scaffold.logs import request_id_var
from wombat_core.errors import InvalidArgument, WombatError, from_os_error

log = logging.getLogger(__name__)

MAX_STATUS_CHARS = 512  # the status travels in headers (8 KiB by default), twice: text and details
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
REQUEST_ID_KEY = "x-request-id"


class RpcMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "wombat_rpc_requests",
            "RPCs finished, by method and status code",
            ["method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "wombat_rpc_duration_seconds",
            "RPC wall time",
            ["method"],
            registry=registry,
            buckets=(0.005, 0.02, 0.1, 0.5, 1, 2.5, 10, 30, 120, 600, float("inf")),
        )
        self.in_flight = Gauge("wombat_rpc_in_flight", "RPCs being served", ["method"], registry=registry)


class ServingState:
    """Shared by the interceptor and the server. Until the service is ready (it is still loading) and once
    it drains, new calls are refused with UNAVAILABLE — deterministically, rather than racing gRPC's own
    shutdown — while in-flight calls run to completion."""

    def __init__(self) -> None:
        self.ready = False
        self.draining = False
        self.failed = False  # the service died while serving (its pod is about to restart)
        self.in_flight = 0


class _CallState:
    """Per-call bookkeeping shared by the unary and streaming wrappers."""

    def __init__(self, method: str, metrics: RpcMetrics, request_id: str, state: ServingState):
        self.method, self.metrics, self.request_id, self.state = method, metrics, request_id, state
        self.started = time.monotonic()
        self.code = grpc.StatusCode.OK

    async def begin(self, context: grpc.aio.ServicerContext) -> None:
        request_id_var.set(self.request_id)
        self.metrics.in_flight.labels(self.method).inc()
        self.state.in_flight += 1
        if self.state.draining or self.state.failed:
            self.code = grpc.StatusCode.UNAVAILABLE
            reason = "has failed and is restarting" if self.state.failed else "is shutting down"
            await context.abort(self.code, f"the server {reason}; retry on another replica")
        if not self.state.ready:
            self.code = grpc.StatusCode.UNAVAILABLE
            await context.abort(
                self.code,
                "the service is still loading; retry shortly (the health check says when it is ready)",
            )
        await context.send_initial_metadata(((REQUEST_ID_KEY, self.request_id),))

    async def fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, OSError):
            exc = from_os_error(exc) or exc  # disk full, permissions: the caller can act on these
        if isinstance(exc, WombatError):
            self.code = status_code_for(exc)
            message = _bounded(exc.message)
            log.info("%s failed: %s %s", self.method, self.code.name, message)
            metadata = {key: _bounded(value, 128) for key, value in exc.metadata.items()}
            await context.abort(self.code, message, rich_status(self.code, message, exc.reason, metadata))
        self.code = grpc.StatusCode.INTERNAL
        log.exception("%s: unexpected error", self.method)
        message = f"internal error (request id {self.request_id}); the server log has the details"
        await context.abort(self.code, message, rich_status(self.code, message, "INTERNAL", {}))

    def end(self, context: grpc.aio.ServicerContext) -> None:
        code = context.code() if hasattr(context, "code") else None
        if isinstance(code, grpc.StatusCode):
            self.code = code
        self.metrics.in_flight.labels(self.method).dec()
        self.state.in_flight -= 1
        self.metrics.requests.labels(self.method, self.code.name).inc()
        self.metrics.latency.labels(self.method).observe(time.monotonic() - self.started)


@dataclass(frozen=True)
class _Undecodable:
    """Stands in for a request whose bytes do not parse (bad UTF-8 in a string field, a corrupt wire
    format). An exception in the deserializer would reach the client as UNKNOWN; the call itself answers
    INVALID_ARGUMENT instead."""

    error: str


def _lenient(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and whatever else bad bytes raise
            return _Undecodable(str(exc))

    return deserialize


def _check_decoded(request) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the request message does not parse: {request.error}")


def _bounded(text: str, limit: int = MAX_STATUS_CHARS) -> str:
    """Messages may quote the caller's input; a huge value must not make the status itself too big for
    gRPC's header limit (the caller would see RESOURCE_EXHAUSTED instead of the real error)."""
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more characters)"


def _wrap_unary(behavior: Callable[..., Awaitable], make_state: Callable[[], _CallState]) -> Callable:
    async def wrapper(request, context):
        state = make_state()
        try:
            await state.begin(context)
            _check_decoded(request)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never leaked
            await state.fail(context, exc)
        finally:
            state.end(context)

    return wrapper


def _wrap_stream(behavior: Callable[..., AsyncIterator], make_state: Callable[[], _CallState]) -> Callable:
    async def wrapper(request, context):
        state = make_state()
        try:
            await state.begin(context)
            _check_decoded(request)
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never leaked
            await state.fail(context, exc)
        finally:
            state.end(context)

    return wrapper


class WombatInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: RpcMetrics, auth_token: str | None, state: ServingState):
        self._metrics = metrics
        self._state = state
        self._expected_auth = f"Bearer {auth_token}".encode() if auth_token else None

    def _authorized(self, method: str, metadata: dict[str, str]) -> bool:
        if self._expected_auth is None or method.startswith(OPEN_METHOD_PREFIXES):
            return True
        # Constant-time comparison; the token itself is never logged.
        return hmac.compare_digest(metadata.get("authorization", "").encode(), self._expected_auth)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        request_id = metadata.get(REQUEST_ID_KEY, "")[:64] or uuid.uuid4().hex[:16]
        if not self._authorized(method, metadata):
            self._metrics.requests.labels(method, grpc.StatusCode.UNAUTHENTICATED.name).inc()
            return _unauthenticated_handler(handler)
        if method.startswith(OPEN_METHOD_PREFIXES):
            return handler  # health and reflection keep answering during a drain, untracked

        def make_state() -> _CallState:
            return _CallState(method, self._metrics, request_id, self._state)

        if handler.request_streaming:
            return handler  # no client-streaming RPCs in the Wombat contracts; pass through untouched
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, make_state),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary, make_state),
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


def _unauthenticated_handler(handler):
    message = "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"

    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            deny_stream, _lenient(handler.request_deserializer), handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        deny_unary, _lenient(handler.request_deserializer), handler.response_serializer
    )
