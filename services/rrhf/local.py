"""The rrhf service in this process, for `wombat train` without --server (a KubeRay RayJob's driver)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from services.rrhf.server import RrhfSettings, build_server
from wombat_core.server import ServerConfig


@contextmanager
def local_service(settings: RrhfSettings) -> Iterator[str]:
    """Serves on a loopback port for the life of the block and yields its address. The caller then uses the
    ordinary client, so a local job gets exactly the service's validation, events and atomic output."""
    import ray

    owns_ray = not ray.is_initialized()  # leave a cluster this process already had alone
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="rrhf-local")
    thread.start()

    def run(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    async def start():
        config = ServerConfig(host="127.0.0.1", port=0, metrics_port=None)
        server, port, servicer = build_server(config, settings)
        await server.start()
        await server.set_serving(True)
        return server, port, servicer

    try:
        server, port, servicer = run(start())
        try:
            yield f"127.0.0.1:{port}"
        finally:
            run(server.stop(0))
            run(servicer.close())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if owns_ray:
            ray.shutdown()
