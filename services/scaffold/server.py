"""`create_server(config, services) -> (server, port)`: the gRPC server every Wombat service runs on.

It adds, for every service: standard health checking (NOT_SERVING until the service calls
`set_serving()`; `wombat.liveness` SERVING for as long as the event loop answers, drains included),
an optional plaintext health-only port for Kubernetes' native gRPC probes (which cannot speak TLS),
server reflection, Prometheus metrics on their own HTTP port, optional TLS / mTLS and
bearer-token auth, request ids in the logs, and a graceful drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from services.scaffold.config import ServerConfig
from services.scaffold.interceptors import RpcMetrics, ServingState, WombatInterceptor

log = logging.getLogger(__name__)

# Health name for liveness probes. It stays SERVING while draining: a drain is not a hang, and a
# liveness failure then would kill the pod before its in-flight streams finish.
LIVENESS_SERVICE = "wombat.liveness"

# The line each service process prints on stdout when it listens and when it is ready; supervisors
# (`wombat up`, the demo, tests) read the ports from it.
READY_PATTERN = re.compile(r"WOMBAT_READY port=(\d+) metrics_port=(\S+)")


def announce(port: int, metrics_port: int | None, state: str = "READY") -> None:
    """Prints WOMBAT_<state> with the ports: what supervisors (`wombat up`, tests) wait for. READY matches
    READY_PATTERN. Every service prints it from here, the HTTP gateway included."""
    print(f"WOMBAT_{state} port={port} metrics_port={metrics_port}", flush=True)


@dataclass(frozen=True)
class ServiceRegistration:
    """A servicer to add: its full proto name (for health and reflection) and the generated add function."""

    full_name: str
    add_to_server: Callable[[grpc.aio.Server], None]


class WombatServer:
    """A started-or-not aio server plus its health servicer and metrics endpoint."""

    def __init__(self, server: grpc.aio.Server, health_servicer, service_names: list[str], config: ServerConfig,
                 registry: CollectorRegistry, state: ServingState):  # fmt: skip
        self.grpc_server = server
        self.probe_server: grpc.aio.Server | None = None  # the plaintext health-only listener, if any
        self.health_port: int | None = None
        self.health = health_servicer
        self.service_names = service_names
        self.config = config
        self.registry = registry
        self.metrics_port: int | None = None
        self._metrics_http = None
        self._state = state
        self._stopping = False
        self.failure: BaseException | None = None  # what killed the service, once it died
        self.failed = asyncio.Event()
        self._failure_watch: asyncio.Task | None = None

    async def start(self) -> None:
        # Health answers NOT_SERVING for every service until the service calls set_serving().
        await self.set_serving(False)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.grpc_server.start()
        if self.probe_server is not None:
            await self.probe_server.start()
        if self.config.metrics_port is not None:
            self._metrics_http, _ = start_http_server(
                self.config.metrics_port, addr=self.config.metrics_host, registry=self.registry
            )
            self.metrics_port = self._metrics_http.server_port
        log.info("serving %s (metrics port %s)", ", ".join(self.service_names), self.metrics_port)

    def announce(self, port: int, state: str = "READY") -> None:
        announce(port, self.metrics_port, state)

    async def set_serving(self, serving: bool = True) -> None:
        self._state.ready = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    def watch_for_failure(self, failure: Awaitable[BaseException]) -> None:
        """Reports the service dead (`fail`) when `failure` completes (the service's wait_until_failed)."""

        async def watch() -> None:
            await self.fail(await failure)

        self._failure_watch = asyncio.get_running_loop().create_task(watch())

    async def fail(self, error: BaseException) -> None:
        """The service cannot serve any more: every health name, liveness included, says NOT_SERVING (the
        kubelet restarts the pod, routers drop it) and new calls get UNAVAILABLE."""
        log.error("the service died: %s", error)
        self.failure = error
        self._state.failed, self._state.ready = True, False
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names, LIVENESS_SERVICE]:
            await self.health.set(name, not_serving)
        self.failed.set()

    @property
    def draining(self) -> bool:
        return self._state.draining

    async def stop(self, grace: float | None = None) -> None:
        """Drains: health goes NOT_SERVING and new calls get UNAVAILABLE at once, while in-flight calls get
        up to `grace` seconds to finish; then the server stops (cancelling whatever is left)."""
        if self._stopping:
            return  # a second stop (the lifecycle's cleanup after a drain) has nothing left to do
        self._stopping = True
        if self._failure_watch is not None and not self._failure_watch.done():
            self._failure_watch.cancel()
        grace = self.config.drain_grace_seconds if grace is None else grace
        self._state.draining = True
        if self.failure is None:  # a dead service keeps its liveness NOT_SERVING
            await self.set_serving(False)
        deadline = asyncio.get_running_loop().time() + grace
        while self._state.in_flight > 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        await self.grpc_server.stop(max(0.0, deadline - asyncio.get_running_loop().time()))
        if self.probe_server is not None:  # last, so probes see the drain to its end
            await self.probe_server.stop(None)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def create_server(config: ServerConfig, services: Sequence[ServiceRegistration]) -> tuple[WombatServer, int]:
    """Builds the server and binds its port; call from inside the event loop that will run it."""
    registry = CollectorRegistry()
    state = ServingState()
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),  # two servers must never share a port silently
    ]
    server = grpc.aio.server(
        interceptors=[WombatInterceptor(RpcMetrics(registry), config.auth_token, state)],
        options=options,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in services:
        service.add_to_server(server)
    names = [s.full_name for s in services]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{config.host}:{config.port}"
    if config.tls is not None:
        credentials = grpc.ssl_server_credentials(
            [(config.tls.key_file.read_bytes(), config.tls.cert_file.read_bytes())],
            root_certificates=config.tls.client_ca_file.read_bytes() if config.tls.client_ca_file else None,
            require_client_auth=config.tls.client_ca_file is not None,
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    wombat_server = WombatServer(server, health_servicer, names, config, registry, state)
    if config.health_port is not None:
        wombat_server.probe_server, wombat_server.health_port = _probe_server(config, health_servicer)
    return wombat_server, port


def _probe_server(config: ServerConfig, health_servicer) -> tuple[grpc.aio.Server, int]:
    """A plaintext listener that serves grpc.health.v1 only (no service RPCs, so no token or TLS needed):
    the kubelet's gRPC probes connect without TLS, so with TLS on the main port they need this one."""
    probe_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probe_server)
    address = f"{config.host}:{config.health_port}"
    port = probe_server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind the health port {address}")
    return probe_server, port
