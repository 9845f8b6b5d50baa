"""`wombat serve rrhf`: the RRHF service as a scaffold `Service`.

It listens at once (NOT_SERVING), joins or starts its Ray cluster, then serves. Jobs persisted by an
earlier run are recovered when the service is built.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.rrhf.jobs import JobStore
from services.rrhf.metrics import register_metrics
from services.rrhf.runner import JobRunner, init_ray
from services.rrhf.servicer import RrhfServicer
from services.scaffold import Service, ServiceRegistration
from wombat.rrhf.v1 import rrhf_pb2, rrhf_pb2_grpc
from wombat_core.dtypes import DTYPES
from wombat_core.errors import InvalidArgument

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
    train_on_gpu: bool = False  # --training-device gpu: training and candidate jobs ask Ray for GPUs
    device_memory_gb: float | None = None  # one training device's memory (a GPU's); None: detected
    scorer_dtype: str = "auto"  # auto: float16 on a GPU (as the reference scored), float32 on CPU
    scorer_idle_seconds: float = 600.0  # an unused scorer pool is closed, giving its GPUs back

    def __post_init__(self) -> None:
        for name in ("model_root", "data_root"):
            if not Path(getattr(self, name)).is_dir():
                raise InvalidArgument(f"--{name.replace('_', '-')} {getattr(self, name)} is not a directory")
        if self.scorer_replicas < 1:
            raise InvalidArgument(f"--scorer-replicas must be >= 1, got {self.scorer_replicas}")
        if self.max_pending_scores < 1:
            raise InvalidArgument(f"--max-pending-scores must be >= 1, got {self.max_pending_scores}")
        if self.device_memory_gb is not None and not 0 < self.device_memory_gb < 1e6:
            raise InvalidArgument(f"--device-memory-gb must be in (0, 1e6), got {self.device_memory_gb}")
        if self.scorer_idle_seconds <= 0:
            raise InvalidArgument(f"--scorer-idle-seconds must be > 0, got {self.scorer_idle_seconds}")
        if self.scorer_dtype not in ("auto", *DTYPES):
            raise InvalidArgument(
                f"--scorer-dtype must be auto, {', '.join(DTYPES)}; got {self.scorer_dtype}"
            )
        if self.scorer_gpus < 0:
            raise InvalidArgument(f"--scorer-gpus must be >= 0, got {self.scorer_gpus}")


class RrhfService(Service):
    name = "rrhf"

    def __init__(self, settings: RrhfSettings):
        self.settings = settings
        state_dir = settings.state_dir or Path(settings.data_root) / ".wombat-jobs"
        store = JobStore(state_dir)
        root = Path(settings.model_root).resolve()
        defaults = {
            "policy_logprob": root / settings.policy_model if settings.policy_model else None,
            "reward_model": root / settings.reward_model if settings.reward_model else None,
        }
        runner = JobRunner(store, state_dir, root, settings.max_failures, settings.train_on_gpu)
        self.servicer = RrhfServicer(root, Path(settings.data_root), store, runner, defaults, settings.scorer_replicas,
                                     settings.scorer_gpus, settings.max_pending_scores,
                                     settings.device_memory_gb, settings.scorer_dtype,
                                     settings.scorer_idle_seconds)  # fmt: skip
        self._owns_ray = False

    def registrations(self) -> list[ServiceRegistration]:
        return [
            ServiceRegistration(
                SERVICE_NAME,
                lambda server: rrhf_pb2_grpc.add_RrhfServiceServicer_to_server(self.servicer, server),
            )
        ]

    def register_metrics(self, registry: CollectorRegistry) -> None:
        register_metrics(registry, self.servicer)

    async def load(self) -> None:
        import ray

        self._owns_ray = not ray.is_initialized()  # leave a cluster this process already had alone
        await asyncio.to_thread(init_ray, self.settings.ray_address)  # starting a local cluster takes seconds

    async def close(self) -> None:
        await self.servicer.close()
        if self._owns_ray:
            import ray

            ray.shutdown()  # a local cluster started by this service stops with it
