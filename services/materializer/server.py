"""`wombat serve materializer`: the materialiser as a scaffold `Service`.

It loads nothing up front, so it is ready as soon as it listens.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

from services.materializer.servicer import MaterializerServicer
from services.scaffold import Service, ServiceRegistration
from wombat.materializer.v1 import materializer_pb2, materializer_pb2_grpc
from wombat_core.errors import InvalidArgument

SERVICE_NAME = materializer_pb2.DESCRIPTOR.services_by_name["MaterializerService"].full_name


class MaterializerService(Service):
    name = "materializer"

    def __init__(self, model_root: Path, max_jobs: int = 2):
        if not Path(model_root).is_dir():
            raise InvalidArgument(f"--model-root {model_root} is not a directory")
        if max_jobs < 1:
            raise InvalidArgument(f"--max-jobs must be >= 1, got {max_jobs}")
        self.servicer = MaterializerServicer(Path(model_root), max_jobs=max_jobs)

    def registrations(self) -> list[ServiceRegistration]:
        return [
            ServiceRegistration(
                SERVICE_NAME,
                lambda server: materializer_pb2_grpc.add_MaterializerServiceServicer_to_server(
                    self.servicer, server
                ),
            )
        ]

    def register_metrics(self, registry: CollectorRegistry) -> None:
        running = Gauge("wombat_materializer_jobs_running", "Materialise, make-delta and convert jobs running now",
                        registry=registry)  # fmt: skip
        running.set_function(lambda: self.servicer.jobs_running)

    async def close(self) -> None:
        self.servicer.close()
