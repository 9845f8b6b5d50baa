"""The rrhf service in this process, for `wombat train` without --server (a KubeRay RayJob's driver)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from services.rrhf.server import RrhfService, RrhfSettings
from services.scaffold import ServerConfig, start_service


@contextmanager
def local_service(settings: RrhfSettings) -> Iterator[str]:
    """Serves on a loopback port for the life of the block and yields its address. The caller then uses the
    ordinary client, so a local job gets exactly the service's validation, events and atomic output."""
    service = RrhfService(settings)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="rrhf-local")
    thread.start()

    def run(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    server = None
    try:
        config = ServerConfig(host="127.0.0.1", port=0, metrics_port=None)
        server, port = run(start_service(config, service))
        yield f"127.0.0.1:{port}"
    finally:
        if server is not None:
            run(server.stop(0))
        run(service.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
