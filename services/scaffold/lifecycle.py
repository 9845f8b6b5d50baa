"""The one serve lifecycle of every Wombat service: listen → load → serve → drain → stop → close.

A service describes itself as a `Service`: the gRPC servicers it registers, its metrics, a `load()`
that may take minutes (weights, a warm-up, a Ray cluster) and a `close()` that releases what it holds.
`serve()` runs one as a process (`wombat serve <name>`):

1. bind and listen at once, health NOT_SERVING (calls get UNAVAILABLE "still loading"); print
   WOMBAT_LISTENING;
2. `load()`; then health SERVING; print WOMBAT_READY (supervisors read the ports from it);
3. serve until SIGTERM/SIGINT, then drain: health NOT_SERVING, new calls UNAVAILABLE, in-flight calls
   get the grace period;
4. stop the server, then `close()` — also when loading failed.

A service that dies while serving (its `wait_until_failed()` returns: an inference engine's step loop
failed) turns every health name NOT_SERVING, liveness included, so that Kubernetes restarts the pod and
routers stop sending to it; `serve()` then stops at once and raises ServiceDied, and the process exits
non-zero. Nothing keeps a dead pod SERVING.

`start_service()` is steps 1–2 for a process that hosts a service itself (tests, `wombat train`
without --server), where nothing reads the ready line.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from services.scaffold.config import ServerConfig
from services.scaffold.server import ServiceRegistration, WombatServer, create_server
from wombat_core.errors import Unavailable

log = logging.getLogger(__name__)


class ServiceDied(Unavailable):
    """The service died while serving; the process must exit non-zero for its supervisor to restart it."""

    reason = "SERVICE_DIED"


class Service:
    """What a service gives the lifecycle. Override what applies: by default a service has no metrics of
    its own, loads nothing (it is ready as soon as it listens) and holds nothing to release."""

    name = "service"

    def registrations(self) -> Sequence[ServiceRegistration]:
        raise NotImplementedError

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Adds the service's own metrics to the server's registry (beside the scaffold's RPC metrics)."""

    async def load(self) -> None:
        """Gets ready to answer calls; health says NOT_SERVING until it returns."""

    async def close(self) -> None:
        """Releases what `load()` and the servicers acquired; runs after the server stopped."""

    async def wait_until_failed(self) -> BaseException:
        """After `load()`: returns when the service can no longer serve (what killed it); by default it
        never does."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def start_service(
    config: ServerConfig, service: Service, *, load: bool = True
) -> tuple[WombatServer, int]:
    """Binds and starts the server (health NOT_SERVING); with `load`, loads the service and reports
    SERVING. Call from inside the event loop that will run the server."""
    server, port = create_server(config, service.registrations())
    service.register_metrics(server.registry)
    await server.start()
    if load:
        await service.load()
        await server.set_serving(True)
        server.watch_for_failure(service.wait_until_failed())
    return server, port


async def serve(config: ServerConfig, service: Service) -> None:
    """Runs `service` until SIGTERM/SIGINT, then drains and stops it (see the module docstring)."""
    server, port = await start_service(config, service, load=False)
    server.announce(port, "LISTENING")
    try:
        await service.load()
        await server.set_serving(True)
        server.watch_for_failure(service.wait_until_failed())
        log.info("%s ready on port %d", service.name, port)
        server.announce(port)
        await run_until_signalled(server)
        if server.failure is not None:
            raise ServiceDied(f"{service.name} failed while serving: {server.failure}")
    finally:
        await server.stop(0)  # at once if loading failed; a no-op after a drain
        await service.close()


async def run_until_signalled(server: WombatServer) -> None:
    """Serves until SIGTERM/SIGINT, then drains gracefully (health NOT_SERVING, in-flight calls finish)."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    waiter = asyncio.create_task(server.wait_for_termination())
    stopper = asyncio.create_task(stop_requested.wait())
    failed = asyncio.create_task(server.failed.wait())
    await asyncio.wait({waiter, stopper, failed}, return_when=asyncio.FIRST_COMPLETED)
    if server.failure is not None:
        log.error("the service failed: stopping at once (%s)", server.failure)
        await server.stop(0)
    elif stop_requested.is_set():
        log.info("signal received: draining for up to %.0fs", server.config.drain_grace_seconds)
        await server.stop()
    for task in (waiter, stopper, failed):
        task.cancel()
