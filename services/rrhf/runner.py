"""Runs jobs on Ray: training through Ray Train's TorchTrainer, candidate generation in a Ray task.

The service process is the Ray driver. `trainer.fit()` blocks, so each job runs on its own thread; a
poller moves the workers' events from the job's channel actor into the job store.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import ray

from services.rrhf.events import create_channel, get_channel
from services.rrhf.jobs import CandidatesJob, JobKind, JobState, JobStore, TrainingJob
from wombat_core.atomic import write_file_atomically
from wombat_core.errors import FailedPrecondition
from wombat_core.host_memory import compute_process_env
from wombat_core.rrhf.candidates import CandidatesConfig
from wombat_core.rrhf.data import PreferenceRecord, dump_jsonl, load_jsonl
from wombat_core.rrhf.events import CandidatesProgress, OutputSaved, from_record, to_record
from wombat_core.rrhf.trainer import TrainingRun
from wombat_core.rrhf.training import TrainingConfig

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


JOBS_DIR = ".wombat-jobs"  # under the model root: each training job's run spec, data and checkpoints
RUN_FILE, RECORDS_FILE, CHECKPOINTS = "run.json", "records.jsonl", "checkpoints"


class JobRunner:
    """Starts, resumes and supervises jobs. A training job's directory on the model store
    (<model root>/.wombat-jobs/<id>/) holds everything needed to resume it after a restart: the run
    spec, a copy of its records, and its sharded checkpoints. Workers on other nodes reach it through
    the shared model store, never a node's /tmp."""

    def __init__(self, store: JobStore, state_dir: Path, model_root: Path, max_failures: int = 2,
                 train_on_gpu: bool = False):  # fmt: skip
        self.store = store
        self.state_dir = Path(state_dir).resolve()  # Ray Train needs an absolute storage path
        self.model_root = Path(model_root).resolve()
        self.max_failures = max_failures
        self.train_on_gpu = train_on_gpu  # the default of jobs whose request does not say
        self._channels: dict[str, object] = {}

    def job_directory(self, job_id: str) -> Path:
        return self.model_root / JOBS_DIR / job_id

    def start_training(self, model_dir: Path, output_dir: Path, output_display: str,
                       records: list[PreferenceRecord], config: TrainingConfig, use_gpu: bool) -> str:  # fmt: skip
        job = self.store.create(JobKind.TRAINING, output_display)
        directory = self.job_directory(job.job_id)
        run = TrainingRun(model_dir, tuple(records), config.for_device(use_gpu), directory / CHECKPOINTS,
                          output_dir, output_display, f"{JOBS_DIR}/{job.job_id}/{CHECKPOINTS}",
                          {k: str(v) for k, v in config.as_dict().items()} | {"job_id": job.job_id})  # fmt: skip
        self._save_run(directory, run, use_gpu)
        self._launch(TrainingJob(job.job_id, run, use_gpu))
        return job.job_id

    def resumable_run(self, job_id: str, num_workers: int | None = None) -> tuple[TrainingRun, bool]:
        """The run (and GPU choice) that `resume_training` would continue, on `num_workers` workers when
        given: the global batch is kept, so the data and the updates are the uninterrupted run's."""
        job = self.store.get(job_id)
        if job.kind is not JobKind.TRAINING:
            raise FailedPrecondition(f"job {job_id} generates candidates; only training jobs resume")
        job.require_resumable()
        directory = self.job_directory(job_id)
        if not (directory / RUN_FILE).is_file():
            raise FailedPrecondition(f"job {job_id} has no run spec in {JOBS_DIR}/{job_id}; start a new job")
        run, use_gpu = self._load_run(directory)
        if num_workers:
            run = dataclasses.replace(run, config=run.config.with_workers(num_workers))
        if run.output_dir.exists():
            raise FailedPrecondition(
                f"the job's output {run.output_display!r} already exists; nothing to resume"
            )
        return run, use_gpu

    def resume_training(self, job_id: str, run: TrainingRun, use_gpu: bool) -> None:
        """Continues a failed or cancelled training job (`resumable_run`) from its latest checkpoint, or from
        the start when it has none."""
        self.store.reopen(job_id)
        self._save_run(self.job_directory(job_id), run, use_gpu)  # the worker count may have changed
        self._launch(TrainingJob(job_id, run, use_gpu))

    def _save_run(self, directory: Path, run: TrainingRun, use_gpu: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / RECORDS_FILE).is_file():
            write_file_atomically(directory / RECORDS_FILE, dump_jsonl(run.records))
        spec = {
            "model_dir": str(run.model_dir.relative_to(self.model_root)),
            "output_dir": str(run.output_dir.relative_to(self.model_root)),
            "output_display": run.output_display,
            "checkpoint_display": run.checkpoint_display,
            "config": run.config.as_dict(),
            "manifest_options": run.manifest_options,
            "use_gpu": use_gpu,
        }
        write_file_atomically(directory / RUN_FILE, json.dumps(spec, indent=1))

    def _load_run(self, directory: Path) -> tuple[TrainingRun, bool]:
        spec = json.loads((directory / RUN_FILE).read_text())
        records = tuple(load_jsonl(directory / RECORDS_FILE, root=self.model_root))
        run = TrainingRun(self.model_root / spec["model_dir"], records, TrainingConfig.from_dict(spec["config"]),
                          directory / CHECKPOINTS, self.model_root / spec["output_dir"], spec["output_display"],
                          spec["checkpoint_display"], spec["manifest_options"])  # fmt: skip
        return run, bool(spec["use_gpu"])

    def _launch(self, job: TrainingJob) -> None:
        channel = self._channels[job.job_id] = create_channel(job.job_id)
        threading.Thread(target=self._run_training, args=(job, channel), daemon=True,
                         name=f"job-{job.job_id}").start()  # fmt: skip

    def _run_training(self, job: TrainingJob, channel) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from services.rrhf.train_worker import train_loop_per_worker

        # GPU or CPU is the job's (or the service's --training-device), never a snapshot of the cluster: a
        # KubeRay cluster scaled to zero has no GPUs until the workers' request makes the autoscaler add them.
        config = job.run.config
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=job,
            scaling_config=ScalingConfig(
                num_workers=config.num_workers,
                use_gpu=job.use_gpu,
                # On CPU each worker gets an equal share of the cores (Ray sets its torch thread count).
                resources_per_worker=None
                if job.use_gpu
                else {"CPU": max(1, (os.cpu_count() or 1) // config.num_workers)},
            ),
            torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
            run_config=RunConfig(
                name=f"{job.job_id}-{self.store.get(job.job_id).attempts}",
                storage_path=str(self.state_dir / "ray-results"),
                failure_config=FailureConfig(max_failures=self.max_failures),
                # A CPU worker's step reuses its buffers instead of page-faulting them in (host_memory.py).
                worker_runtime_env={} if job.use_gpu else {"env_vars": compute_process_env()},
            ),
        )
        self._supervise(job.job_id, channel, lambda: trainer.fit().error)

    def start_candidates(self, model_dir: Path, reward_model_dir: Path, output_file: Path, output_display: str,
                         config: CandidatesConfig, use_gpu: bool) -> str:  # fmt: skip
        job = self.store.create(JobKind.CANDIDATES, output_display)
        channel = self._channels[job.job_id] = create_channel(job.job_id)
        spec = CandidatesJob(
            job.job_id, model_dir, reward_model_dir, output_file, output_display, config, use_gpu
        )

        def work() -> None:
            # The task reserves the GPU it generates on, so Ray never places it beside a GPU it does not hold.
            ray.get(candidates_task.options(num_gpus=1 if use_gpu else 0).remote(spec))

        threading.Thread(target=self._supervise, args=(job.job_id, channel, work),
                         daemon=True, name=f"job-{job.job_id}").start()  # fmt: skip
        return job.job_id

    def _supervise(self, job_id: str, channel, work: Callable[[], BaseException | None]) -> None:
        """Marks the job running, runs `work` (which returns or raises the job's error) while relaying
        the job's events to the store, then records how it ended."""
        self.store.set_state(job_id, JobState.RUNNING)
        stop = threading.Event()
        poller = threading.Thread(target=self._poll, args=(job_id, channel, stop), daemon=True)
        poller.start()
        try:
            error = work()
        except Exception as exc:  # noqa: BLE001 - any failure ends the job with its reason
            error = exc
        stop.set()
        poller.join()
        try:
            self._drain(job_id, channel)  # the last events (the saved output among them) must arrive
        except Exception as exc:  # noqa: BLE001
            error = error or RuntimeError(f"the job's final events could not be collected: {exc}")
        self._finish(job_id, channel, error)

    def _poll(self, job_id: str, channel, stop: threading.Event) -> None:
        while not stop.wait(0.3):
            try:
                self._drain(job_id, channel)
            except Exception as exc:  # noqa: BLE001 - a missed poll is retried; the final drain is not
                log.debug("job %s: event poll failed, retrying: %s", job_id, exc)

    def _drain(self, job_id: str, channel) -> None:
        for record in ray.get(channel.drain.remote(), timeout=10):
            self.store.append(job_id, from_record(record))

    def _finish(self, job_id: str, channel, error: BaseException | None) -> None:
        job = self.store.get(job_id)
        if ray.get(channel.cancelled.remote()):
            self.store.set_state(job_id, JobState.CANCELLED, "cancelled by a client")
        elif error is not None:
            log.warning("job %s failed: %s", job_id, error)
            self.store.set_state(job_id, JobState.FAILED, _reason(error))
        elif not any(isinstance(e, OutputSaved) for e in job.events):
            self.store.set_state(job_id, JobState.FAILED, "the job ended without saving its output")
        else:
            self.store.set_state(job_id, JobState.SUCCEEDED)
        ray.kill(channel)

    def cancel(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job.finished:
            return
        channel = self._channels.get(job_id)
        if channel is not None:
            channel.cancel.remote()
        else:
            self.store.set_state(job_id, JobState.CANCELLED, "cancelled by a client")


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
        on_progress=lambda done, total: channel.put.remote(to_record(CandidatesProgress(done, total))),
        cancelled=lambda: ray.get(channel.cancelled.remote()),
    )
    job.output_file.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(job.output_file, dump_jsonl(records))
    channel.put.remote(to_record(OutputSaved(job.output_display)))
    return len(records)
