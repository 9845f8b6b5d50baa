"""`wombat serve inference`: the inference service as a scaffold `Service`.

It listens at once (NOT_SERVING), then loads the weights, starts the engine and warms it up, then serves.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from services.inference.metrics import InferenceMetrics
from services.inference.servicer import InferenceServicer
from services.scaffold import Service, ServiceRegistration
from wombat.inference.v1 import inference_pb2, inference_pb2_grpc
from wombat_core.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from wombat_core.engine.loading import LoadedModel, load_for_serving
from wombat_core.engine.prompting import PromptFormat

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name

# Warm-up requests run every sampler path (greedy; seeded sampling with top-k/top-p/min-p, repetition
# penalty and min-new-tokens), so a model or device that cannot sample fails before the pod says SERVING.
WARM_UP = (
    SamplingParams(temperature=0, max_new_tokens=2),
    SamplingParams(
        temperature=0.7,
        top_k=20,
        top_p=0.9,
        min_p=0.01,
        repetition_penalty=1.1,
        min_new_tokens=2,
        max_new_tokens=2,
        seed=0,
    ),  # fmt: skip
)


@dataclass(frozen=True)
class InferenceSettings:
    model_dir: Path
    dtype: str = "auto"
    device: str = "auto"
    default_format: PromptFormat = PromptFormat.ALPACA
    max_batch_size: int = 8
    max_queue: int = 64
    max_prefill_tokens: int = 512
    max_new_tokens_limit: int = 4096
    cpu_threads: int | None = (
        None  # the engine's intra-op threads on CPU; None: every core this process may use
    )


def load_engine(settings: InferenceSettings) -> tuple[LoadedModel, Engine]:
    """Loads the weights, starts the engine and runs the warm-up generations through it.

    Loading runs single-threaded and the engine thread gets the cores: one multi-threaded OpenMP team per
    process (EngineConfig.cpu_threads says why)."""
    torch.set_num_threads(1)
    loaded = load_for_serving(
        settings.model_dir, dtype=settings.dtype, device=settings.device, packed_kernels=True
    )
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            max_prefill_tokens=settings.max_prefill_tokens,
            context_length=loaded.context_length,
            max_new_tokens_limit=settings.max_new_tokens_limit,
            cpu_threads=settings.cpu_threads or len(os.sched_getaffinity(0)),
        ),
    )
    engine.start()
    try:
        prompt = tuple(loaded.tokenizer("warm-up")["input_ids"]) or (0,)
        for number, params in enumerate(WARM_UP):
            for _ in engine.generate(GenerationRequest(f"warm-up-{number}", prompt, params)):
                pass
    except Exception:
        engine.stop()
        raise
    return loaded, engine


class InferenceService(Service):
    name = "inference"

    def __init__(self, settings: InferenceSettings):
        self.settings = settings
        self.servicer = InferenceServicer(
            settings.default_format, settings.max_batch_size, settings.max_queue
        )

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
        loaded, engine = await asyncio.to_thread(load_engine, self.settings)
        self.servicer.attach(loaded, engine)

    async def close(self) -> None:
        if self.servicer.engine is not None:
            await asyncio.to_thread(self.servicer.engine.stop)
