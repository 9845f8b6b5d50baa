"""Entry point of `wombat serve rrhf`: joins or starts Ray, recovers persisted jobs, serves."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from services.rrhf.jobs import JobStore
from services.rrhf.metrics import register_metrics
from services.rrhf.runner import JobRunner, init_ray
from services.rrhf.servicer import RrhfServicer
from wombat.rrhf.v1 import rrhf_pb2, rrhf_pb2_grpc
from wombat_core.errors import InvalidArgument
from wombat_core.server import (
    ServerConfig,
    ServiceRegistration,
    WombatServer,
    create_server,
    run_until_signalled,
)

log = logging.getLogger(__name__)

SERVICE_NAME = rrhf_pb2.DESCRIPTOR.services_by_name["RrhfService"].full_name


@dataclass(frozen=True)
class RrhfSettings:
    model_root: Path
    data_root: Path
    state_dir: Path | None = None  # default: <data root>/.wombat-jobs
    ray_address: str | None = None
    scorer_replicas: int = 1
    scorer_gpus: float = 0.0  # GPUs per scorer actor (fractions share one); 0 scores on CPU
    max_pending_scores: int = 64  # Score/Rank requests in progress per model; more get RESOURCE_EXHAUSTED
    policy_model: str | None = None  # default model for policy_logprob, relative to the model root
    reward_model: str | None = None  # default reward model, relative to the model root
    max_failures: int = 2


def build_server(config: ServerConfig, settings: RrhfSettings) -> tuple[WombatServer, int, RrhfServicer]:
    for name in ("model_root", "data_root"):
        if not Path(getattr(settings, name)).is_dir():
            raise InvalidArgument(f"--{name.replace('_', '-')} {getattr(settings, name)} is not a directory")
    if settings.scorer_replicas < 1:
        raise InvalidArgument(f"--scorer-replicas must be >= 1, got {settings.scorer_replicas}")
    if settings.max_pending_scores < 1:
        raise InvalidArgument(f"--max-pending-scores must be >= 1, got {settings.max_pending_scores}")
    if settings.scorer_gpus < 0:
        raise InvalidArgument(f"--scorer-gpus must be >= 0, got {settings.scorer_gpus}")
    init_ray(settings.ray_address)
    state_dir = settings.state_dir or Path(settings.data_root) / ".wombat-jobs"
    store = JobStore(state_dir)
    runner = JobRunner(store, state_dir, settings.max_failures)
    root = Path(settings.model_root).resolve()
    defaults = {
        "policy_logprob": root / settings.policy_model if settings.policy_model else None,
        "reward_model": root / settings.reward_model if settings.reward_model else None,
    }
    servicer = RrhfServicer(root, Path(settings.data_root), store, runner, defaults, settings.scorer_replicas,
                            settings.scorer_gpus, settings.max_pending_scores)  # fmt: skip
    registration = ServiceRegistration(
        SERVICE_NAME, lambda server: rrhf_pb2_grpc.add_RrhfServiceServicer_to_server(servicer, server)
    )
    server, port = create_server(config, [registration])
    register_metrics(server.registry, servicer)
    return server, port, servicer


async def serve(config: ServerConfig, settings: RrhfSettings) -> None:
    await asyncio.to_thread(init_ray, settings.ray_address)  # starting a local cluster takes seconds
    server, port, servicer = build_server(config, settings)
    await server.start()
    await server.set_serving(True)
    log.info("rrhf service on port %d", port)
    server.announce(port)
    try:
        await run_until_signalled(server)
    finally:
        await servicer.close()
        import ray

        ray.shutdown()  # a local cluster started by this process stops with it
