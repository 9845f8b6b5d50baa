"""Entry point of `wombat serve inference`: listen at once (NOT_SERVING), load and warm up, then SERVING."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from services.inference.metrics import InferenceMetrics
from services.inference.servicer import InferenceServicer
from wombat.inference.v1 import inference_pb2, inference_pb2_grpc
from wombat_core.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from wombat_core.engine.loading import LoadedModel, load_for_serving
from wombat_core.engine.prompting import PromptFormat
from wombat_core.server import (
    ServerConfig,
    ServiceRegistration,
    WombatServer,
    create_server,
    run_until_signalled,
)

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


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


def build_server(
    config: ServerConfig, settings: InferenceSettings
) -> tuple[WombatServer, int, InferenceServicer]:
    servicer = InferenceServicer(settings.default_format, settings.max_batch_size)
    registration = ServiceRegistration(
        SERVICE_NAME,
        lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server),
    )
    server, port = create_server(config, [registration])
    servicer.metrics = InferenceMetrics(server.registry)
    return server, port, servicer


def load_engine(settings: InferenceSettings) -> tuple[LoadedModel, Engine]:
    """Loads the weights, starts the engine and runs one warm-up generation through it."""
    loaded = load_for_serving(settings.model_dir, dtype=settings.dtype, device=settings.device)
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            max_prefill_tokens=settings.max_prefill_tokens,
            context_length=loaded.context_length,
            max_new_tokens_limit=settings.max_new_tokens_limit,
        ),
    )
    engine.start()
    warm_up(engine, loaded.tokenizer)
    return loaded, engine


def warm_up(engine: Engine, tokenizer) -> None:
    import threading

    done = threading.Event()
    failures: list[Exception] = []

    def sink(event) -> None:
        if event.error is not None:
            failures.append(event.error)
        if event.finished:
            done.set()

    prompt = tuple(tokenizer("warm-up")["input_ids"]) or (0,)
    engine.submit(GenerationRequest("warm-up", prompt, SamplingParams(temperature=0, max_new_tokens=2)), sink)
    if not done.wait(600) or failures:
        raise RuntimeError(f"warm-up generation failed: {failures or 'timed out'}")


async def serve(config: ServerConfig, settings: InferenceSettings) -> None:
    server, port, servicer = build_server(config, settings)
    await server.start()  # health answers NOT_SERVING while the model loads
    server.announce(port, "LISTENING")
    loaded, engine = await asyncio.to_thread(load_engine, settings)
    servicer.attach(loaded, engine)
    await server.set_serving(True)
    log.info("inference ready on port %d: %s (%s on %s)", port, loaded.name, loaded.dtype, loaded.device)
    server.announce(port)
    try:
        await run_until_signalled(server)
    finally:
        engine.stop()
