"""The gateway's edge, as plain ASGI layers that run before FastAPI parses anything.

- `Edge` checks the API key (constant-time) and caps the body: a caller without the key, or with a
  body over the limit, is answered (401, 413) before a byte of JSON is parsed. A body under the limit is
  read once and replayed to the app; after it, `receive` is the server's own, so a route still sees the
  client's disconnect.
- `CountRequests` counts every HTTP request by route and status, timed to the last byte.

Plain ASGI, not Starlette's BaseHTTPMiddleware: that wraps `receive` and hides the disconnect.
"""

from __future__ import annotations

import hmac
import re
import time
import uuid

from services.gateway.errors import OpenAIError
from services.gateway.metrics import GatewayMetrics

# Paths that need the key; /health and /metrics stay open for probes and scrapers.
PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[^A-Za-z0-9._:\-]")
MAX_REQUEST_ID_CHARS = 128


class Edge:
    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        refusal = self._refusal(headers)
        if refusal is None:
            body, refusal = await self._read_body(receive)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _refusal(self, headers: dict[bytes, bytes]) -> OpenAIError | None:
        if self.api_key is not None:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.api_key.encode()):
                return OpenAIError(401, "invalid API key: send it as 'Authorization: Bearer <key>'",
                                   code="invalid_api_key")  # fmt: skip
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return self._too_large()
        return None

    async def _read_body(self, receive) -> tuple[bytes, OpenAIError | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", OpenAIError(499, "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _too_large(self) -> OpenAIError:
        return OpenAIError(413, f"the request body is larger than this server accepts ({self.max_body_bytes} "
                                "bytes); send fewer or shorter prompts per request", code="request_too_large")  # fmt: skip


def request_id(headers) -> str:
    """The caller's x-request-id, kept to what gRPC metadata and logs take (ASCII letters, digits, `._:-`,
    at most 128 characters); a fresh one when nothing usable is left."""
    given = _REQUEST_ID.sub("", headers.get(REQUEST_ID_HEADER, ""))[:MAX_REQUEST_ID_CHARS]
    return given or uuid.uuid4().hex


class CountRequests:
    """Counts every HTTP request by route and status, timed to the last byte."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenizer_info", "/tokenize",
              "/detokenize")  # fmt: skip

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
