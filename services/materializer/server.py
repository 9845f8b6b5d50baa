"""Entry point of `wombat serve materializer`."""

from __future__ import annotations

import logging
from pathlib import Path

from prometheus_client import Gauge

from services.materializer.servicer import MaterializerServicer
from wombat.materializer.v1 import materializer_pb2, materializer_pb2_grpc
from wombat_core.errors import InvalidArgument
from wombat_core.server import (
    ServerConfig,
    ServiceRegistration,
    WombatServer,
    create_server,
    run_until_signalled,
)

log = logging.getLogger(__name__)

SERVICE_NAME = materializer_pb2.DESCRIPTOR.services_by_name["MaterializerService"].full_name


def build_server(
    config: ServerConfig, model_root: Path, max_jobs: int = 2
) -> tuple[WombatServer, int, MaterializerServicer]:
    if not Path(model_root).is_dir():
        raise InvalidArgument(f"--model-root {model_root} is not a directory")
    servicer = MaterializerServicer(Path(model_root), max_jobs=max_jobs)
    registration = ServiceRegistration(
        SERVICE_NAME,
        lambda server: materializer_pb2_grpc.add_MaterializerServiceServicer_to_server(servicer, server),
    )
    server, port = create_server(config, [registration])
    running = Gauge("wombat_materializer_jobs_running", "Materialise, make-delta and convert jobs running now",
                    registry=server.registry)  # fmt: skip
    running.set_function(lambda: servicer.jobs_running)
    return server, port, servicer


async def serve(config: ServerConfig, model_root: Path, max_jobs: int = 2) -> None:
    server, port, servicer = build_server(config, model_root, max_jobs)
    await server.start()
    # The materialiser loads nothing up front, so it is ready as soon as it listens.
    await server.set_serving(True)
    log.info("materialiser listening on port %d, model root %s", port, servicer.root.root)
    server.announce(port)
    try:
        await run_until_signalled(server)
    finally:
        servicer.close()
