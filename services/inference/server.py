"""`wombat serve inference`: the inference service as a scaffold `Service`.

It listens at once (NOT_SERVING), then starts its engine backend (the in-house engine or vLLM, see
wombat_core/engine/backend.py), warms it up, then serves. When the engine dies, `wait_until_failed`
returns and the lifecycle reports NOT_SERVING on every health name and exits non-zero, for Kubernetes to
restart the pod.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry

from services.inference.metrics import InferenceMetrics
from services.inference.servicer import InferenceServicer
from services.scaffold import Service, ServiceRegistration
from wombat.inference.v1 import inference_pb2, inference_pb2_grpc
from wombat_core.cpus import available_cpus
from wombat_core.engine.backend import BackendSettings, EngineBackend, WombatBackend
from wombat_core.engine.prompting import PromptFormat
from wombat_core.engine.vllm_backend import VllmBackend, vllm_available

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
log = logging.getLogger(__name__)


class EngineKind(enum.Enum):
    AUTO = "auto"  # vLLM where CUDA and vllm are present, else the in-house engine
    WOMBAT = "wombat"
    VLLM = "vllm"


def resolve_engine(kind: EngineKind, device: str) -> EngineKind:
    if kind is not EngineKind.AUTO:
        return kind
    gpu = device != "cpu" and torch.cuda.is_available()
    return EngineKind.VLLM if gpu and vllm_available() else EngineKind.WOMBAT


@dataclass(frozen=True)
class InferenceSettings(BackendSettings):
    """The service's flags: what both backends are built from, plus the engine to pick and the prompt
    format of requests that set none. `cpu_threads` None means the pod's CPU quota."""

    engine: EngineKind = EngineKind.AUTO
    default_format: PromptFormat = PromptFormat.ALPACA


async def start_backend(settings: InferenceSettings) -> EngineBackend:
    """Starts the chosen backend and runs the warm-up generations through it."""
    kind = await asyncio.to_thread(
        resolve_engine, settings.engine, settings.device
    )  # may import vllm (~10 s)
    log.info("engine: %s", kind.value)
    settings = dataclasses.replace(settings, cpu_threads=settings.cpu_threads or available_cpus())
    if kind is EngineKind.VLLM:
        backend: EngineBackend = await VllmBackend.load(settings)
    else:
        backend = await asyncio.to_thread(WombatBackend.load, settings)
    try:
        await backend.warm_up()
    except BaseException:
        await backend.stop()
        raise
    return backend


class InferenceService(Service):
    name = "inference"

    def __init__(self, settings: InferenceSettings):
        self.settings = settings
        self.servicer = InferenceServicer(settings.default_format)

    def registrations(self) -> list[ServiceRegistration]:
        return [
            ServiceRegistration(
                SERVICE_NAME,
                lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(
                    self.servicer, server
                ),
            )
        ]

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.servicer.metrics = InferenceMetrics(registry, self.settings.model_dir.name)

    async def load(self) -> None:
        self.servicer.attach(await start_backend(self.settings))

    async def wait_until_failed(self) -> BaseException:
        assert self.servicer.backend is not None, "the lifecycle watches a service once it is loaded"
        return await self.servicer.backend.wait_until_failed()

    async def close(self) -> None:
        if self.servicer.backend is not None:
            await self.servicer.backend.stop()
