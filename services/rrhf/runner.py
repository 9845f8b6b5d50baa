"""Runs jobs on Ray: training through Ray Train's TorchTrainer, candidate generation in a Ray task.

The service process is the Ray driver. `trainer.fit()` blocks, so each job runs on its own thread; a
poller moves the workers' events from the job's channel actor into the job store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import ray

from services.rrhf.events import create_channel, get_channel
from services.rrhf.jobs import CandidatesJob, JobKind, JobState, JobStore, TrainingJob
from wombat_core.atomic import write_file_atomically
from wombat_core.rrhf.candidates import CandidatesConfig
from wombat_core.rrhf.data import PreferenceRecord
from wombat_core.rrhf.training import TrainingConfig, plan

log = logging.getLogger(__name__)


def init_ray(address: str | None, num_cpus: int | None = None, attempts: int = 2) -> None:
    """Joins `address` (a KubeRay head, say; else $RAY_ADDRESS) or starts a local cluster. Logical CPUs
    on a local cluster are at least 4 so that a 2-worker training job and the scorer actors fit on a
    small machine. A local start is retried once: on a loaded host Ray's node can miss its start-up
    deadline ("the current node timed out during startup") and then comes up fine the second time."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")  # set for a RayJob's driver: join that cluster
    if address:
        ray.init(address=address, namespace="wombat-rrhf", log_to_driver=False)
        return
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                     namespace="wombat-rrhf", log_to_driver=False, logging_level="WARNING")  # fmt: skip
            return
        except Exception:
            ray.shutdown()
            if attempt == attempts:
                raise
            log.warning("the local Ray cluster did not start (attempt %d of %d); retrying", attempt, attempts)


class JobRunner:
    def __init__(self, store: JobStore, state_dir: Path, max_failures: int = 2):
        self.store = store
        self.state_dir = Path(state_dir).resolve()  # Ray Train needs an absolute storage path
        self.max_failures = max_failures
        self._channels: dict[str, object] = {}

    def start_training(self, model_dir: Path, output_dir: Path, output_display: str,
                       records: list[PreferenceRecord], config: TrainingConfig) -> str:  # fmt: skip
        job = self.store.create(JobKind.TRAINING, output_display)
        channel = self._channels[job.job_id] = create_channel(job.job_id)
        spec = TrainingJob(job.job_id, model_dir, output_dir, output_display, tuple(records), config)
        threading.Thread(target=self._run_training, args=(spec, channel), daemon=True,
                         name=f"job-{job.job_id}").start()  # fmt: skip
        return job.job_id

    def _run_training(self, job: TrainingJob, channel) -> None:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from services.rrhf.train_worker import train_loop_per_worker

        # The cluster's GPUs, not this process's: on KubeRay the service is a GPU-less driver pod.
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        config = job.config.for_device(use_gpu)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=dataclasses.replace(job, config=config),
            scaling_config=ScalingConfig(
                num_workers=config.num_workers,
                use_gpu=use_gpu,
                # On CPU each worker gets an equal share of the cores (Ray sets its torch thread count).
                resources_per_worker=None
                if use_gpu
                else {"CPU": max(1, (os.cpu_count() or 1) // config.num_workers)},
            ),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                name=job.job_id,
                storage_path=str(self.state_dir / "ray-results"),
                failure_config=FailureConfig(max_failures=self.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        total_steps = plan(config, len(job.records)).total_steps
        self._supervise(job.job_id, channel, total_steps, lambda: trainer.fit().error)

    def start_candidates(self, model_dir: Path, reward_model_dir: Path, output_file: Path, output_display: str,
                         config: CandidatesConfig) -> str:  # fmt: skip
        job = self.store.create(JobKind.CANDIDATES, output_display)
        channel = self._channels[job.job_id] = create_channel(job.job_id)
        spec = CandidatesJob(job.job_id, model_dir, reward_model_dir, output_file, output_display, config)

        def work() -> None:
            ray.get(candidates_task.remote(spec))

        threading.Thread(target=self._supervise, args=(job.job_id, channel, len(config.queries), work),
                         daemon=True, name=f"job-{job.job_id}").start()  # fmt: skip
        return job.job_id

    def _supervise(self, job_id: str, channel, total: int, work: Callable[[], BaseException | None]) -> None:
        """Marks the job running, runs `work` (which returns or raises the job's error) while relaying
        the job's events to the store, then records how it ended."""
        self._set_state(job_id, JobState.RUNNING)
        stop = threading.Event()
        poller = threading.Thread(target=self._poll, args=(job_id, channel, total, stop), daemon=True)
        poller.start()
        try:
            error = work()
        except Exception as exc:  # noqa: BLE001 - any failure ends the job with its reason
            error = exc
        stop.set()
        poller.join()
        self._drain(job_id, channel, total)
        self._finish(job_id, channel, error)

    def _poll(self, job_id: str, channel, total_steps: int, stop: threading.Event) -> None:
        while not stop.wait(0.3):
            self._drain(job_id, channel, total_steps)

    def _drain(self, job_id: str, channel, total_steps: int) -> None:
        try:
            events = ray.get(channel.drain.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a missed poll is retried
            return
        for event in events:
            changes = {}
            if event["kind"] == "step":
                changes = {"latest": event, "progress": event["step"] / max(1, total_steps)}
            elif event["kind"] == "progress":
                changes = {"progress": event["done"] / max(1, event["total"])}
            elif event["kind"] == "checkpoint":
                changes = {"last_checkpoint_step": event["step"]}
            self.store.update(job_id, event, **changes)

    def _set_state(self, job_id: str, state: JobState, **changes) -> None:
        self.store.update(job_id, {"kind": "state", "state": state}, state=state, **changes)

    def _finish(self, job_id: str, channel, error: BaseException | None) -> None:
        job = self.store.get(job_id)
        if ray.get(channel.cancelled.remote()):
            self._set_state(job_id, JobState.CANCELLED, error="cancelled by a client")
        elif error is not None:
            log.warning("job %s failed: %s", job_id, error)
            self._set_state(job_id, JobState.FAILED, error=_reason(error))
        elif not any(e.get("kind") == "saved" for e in job.events):
            self._set_state(job_id, JobState.FAILED, error="the job ended without saving its output")
        else:
            self._set_state(job_id, JobState.SUCCEEDED, progress=1.0)
        ray.kill(channel)

    def cancel(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job.finished:
            return
        channel = self._channels.get(job_id)
        if channel is not None:
            channel.cancel.remote()
        else:
            self._set_state(job_id, JobState.CANCELLED, error="cancelled by a client")


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:500]


@ray.remote(num_cpus=1)
def candidates_task(job: CandidatesJob) -> int:
    """The core's `generate_candidates` in a Ray task: events to the job's channel, output written
    atomically. Returns how many records it wrote."""
    from wombat_core.engine.loading import load_for_serving
    from wombat_core.rrhf.candidates import generate_candidates
    from wombat_core.rrhf.data import dump_jsonl
    from wombat_core.rrhf.scoring import RewardModel

    channel = get_channel(job.job_id)
    records = generate_candidates(
        load_for_serving(job.model_dir),
        RewardModel.load(job.reward_model_dir),
        job.config,
        on_progress=lambda done, total: channel.put.remote(
            {"kind": "progress", "done": done, "total": total}
        ),
        cancelled=lambda: ray.get(channel.cancelled.remote()),
    )
    job.output_file.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(job.output_file, dump_jsonl(records))
    channel.put.remote({"kind": "saved", "path": job.output_display})
    return len(records)
