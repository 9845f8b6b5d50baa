"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status the openai
SDKs turn into their exception classes (400 BadRequestError, 401 AuthenticationError, 404
NotFoundError, 429 RateLimitError, 503 InternalServerError).

gRPC statuses from the inference replicas map here, in one place; the replica's message is passed on,
since it says what to fix, and google.rpc.ErrorInfo's "field" becomes `param`.
"""

from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse

from clients.base import error_info

# (HTTP status, OpenAI error type) per gRPC code; anything else is a 502 from the gateway's view.
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
          504: "timeout"}  # fmt: skip
DEFAULT_RETRY_AFTER_SECONDS = "1"


class OpenAIError(Exception):
    """Raised anywhere in a request; the app turns it into the JSON error response."""

    def __init__(self, status: int, message: str, param: str | None = None, *, code: str | None = None,
                 retry_after: str | None = None, kind: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after
        self.kind = kind or _TYPES.get(status, "api_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": self.retry_after} if self.retry_after else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def replica_full(error: grpc.RpcError) -> bool:
    """RESOURCE_EXHAUSTED from a replica's queue (it carries the server's ErrorInfo), as against gRPC's own
    RESOURCE_EXHAUSTED for a message over the size limit, raised in the client: that one is the request's
    fault, and no other replica would take it either."""
    return error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and error_info(error) is not None


def worth_another_replica(error: grpc.RpcError) -> bool:
    """A refusal that says nothing of the request: the replica is unavailable, or its queue is full."""
    return error.code() is grpc.StatusCode.UNAVAILABLE or replica_full(error)


def from_rpc_error(error: grpc.RpcError, field_names: dict[str, str]) -> OpenAIError:
    """The OpenAI error for a replica's gRPC status; `field_names` maps contract fields to OpenAI's."""
    code = error.code()
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and not replica_full(error):
        return OpenAIError(413, f"the request is too large to send to a replica ({error.details()}); send fewer "
                                "or shorter prompts", code="request_too_large")  # fmt: skip
    status, kind = _HTTP.get(code, (502, "api_error"))
    info = error_info(error)
    metadata = dict(info.metadata) if info is not None else {}
    param = metadata.get("field")
    retry_after = None
    if status == 429:
        retry_after = metadata.get("retry_after_seconds", DEFAULT_RETRY_AFTER_SECONDS)
    if status == 502:
        message = f"an inference replica failed: {code.name}: {error.details()}"
    else:
        message = error.details() or code.name
    return OpenAIError(status, message, field_names.get(param, param), code=info.reason.lower() if info else None,
                       retry_after=retry_after, kind=kind)  # fmt: skip
