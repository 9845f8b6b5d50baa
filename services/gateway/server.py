"""`wombat serve gateway`: the OpenAI-compatible HTTP gateway as its own process (uvicorn).

It follows the stages of the suite's one serve lifecycle (services/scaffold/lifecycle.py), on HTTP:

1. bind and listen at once; /health says 503 and /v1 answers 503 until a replica answers; print
   WOMBAT_LISTENING;
2. when the first replica answers ModelInfo: ready; print WOMBAT_READY (the same line, from the same
   function, as every gRPC service, so `wombat up` and the tests supervise it alike);
3. SIGTERM/SIGINT: drain — /health and new requests get 503 while in-flight streams get the grace
   period; a second signal stops at once;
4. stop uvicorn, close the replica channels.

The gRPC scaffold itself is not reused: uvicorn owns the HTTP loop and its sockets.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass

import uvicorn
from prometheus_client import CollectorRegistry

from services.gateway.app import GatewayState, create_app
from services.gateway.metrics import GatewayMetrics
from services.gateway.replicas import Balance, ReplicaPool
from services.scaffold.server import announce
from wombat_core.errors import InvalidArgument

log = logging.getLogger(__name__)
API_KEY_ENV = "WOMBAT_GATEWAY_API_KEY"  # the key callers must send, when no --api-key-file is given


@dataclass(frozen=True)
class GatewaySettings:
    upstreams: tuple[str, ...]  # inference replicas, host:port
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    balance: Balance = Balance.LEAST_LOADED
    default_max_tokens: int = 512
    drain_seconds: float = 30.0
    upstream_timeout: float = 600.0
    poll_seconds: float = 0.5
    max_body_bytes: int = 8 * 1024 * 1024  # below the 16 MiB gRPC message limit, so a body never overflows it

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key:
            raise InvalidArgument("the API key is empty (an empty --api-key-file?); put the key in it, or leave "
                                  "the option out to check no key")  # fmt: skip
        if self.max_body_bytes < 1024:
            raise InvalidArgument(f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        if not self.upstreams:
            raise InvalidArgument("the gateway needs at least one --upstream inference replica (host:port)")
        if self.poll_seconds <= 0:
            raise InvalidArgument(f"--poll-seconds must be > 0, got {self.poll_seconds}")
        if self.default_max_tokens < 1:
            raise InvalidArgument(f"--default-max-tokens must be >= 1, got {self.default_max_tokens}")


class _DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before the stop: the first signal refuses new work and waits for in-flight
    requests (up to the grace period), then stops; a second signal stops at once."""

    def __init__(self, config: uvicorn.Config, state: GatewayState, drain_seconds: float):
        super().__init__(config)
        self.state, self.drain_seconds = state, drain_seconds
        self.loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining or self.loop is None:
            super().handle_exit(sig, frame)
            return
        self.state.draining = True
        log.info("signal received: draining for up to %.0fs", self.drain_seconds)
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain()))

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_seconds
        while self.state.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


async def serve(settings: GatewaySettings) -> None:
    """Runs the gateway until SIGTERM/SIGINT (see the module docstring)."""
    registry = CollectorRegistry()
    pool = ReplicaPool(
        list(settings.upstreams), settings.balance, settings.poll_seconds, settings.upstream_timeout
    )
    state = GatewayState(pool, GatewayMetrics(registry), registry, settings.api_key, settings.served_model_name,
                         settings.default_max_tokens, max_body_bytes=settings.max_body_bytes)  # fmt: skip
    sock = bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(state), log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=1, timeout_keep_alive=30)  # fmt: skip
    server = _DrainingServer(config, state, settings.drain_seconds)
    server.loop = asyncio.get_running_loop()
    await pool.start()
    announce(port, port, "LISTENING")

    async def become_ready() -> None:
        state.info = await pool.wait_until_one_answers()
        while not server.started:
            await asyncio.sleep(0.01)
        log.info("gateway ready on port %d, serving %s", port, state.model_name)
        announce(port, port)

    readiness = asyncio.create_task(become_ready())
    try:
        await server.serve(sockets=[sock])
    finally:
        readiness.cancel()
        await pool.close()
        sock.close()
