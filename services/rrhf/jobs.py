"""Training and candidate-generation jobs: state persisted per job, run on Ray, watched as event streams.

Each job is a JSON file under the state directory, rewritten atomically on every change, so a restarted
service still knows every job. A job that was running when the service stopped is marked FAILED with
the reason and its last checkpoint (start a new job to continue); it is never silently lost.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from wombat_core.atomic import write_file_atomically
from wombat_core.errors import NotFound
from wombat_core.rrhf.candidates import CandidatesConfig
from wombat_core.rrhf.data import PreferenceRecord
from wombat_core.rrhf.training import TrainingConfig

log = logging.getLogger(__name__)

MAX_EVENTS_KEPT = 2000


class JobKind(StrEnum):
    TRAINING = "training"
    CANDIDATES = "candidates"


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class TrainingJob:
    """Everything a Ray Train worker needs for one training job (Ray pickles it to the workers)."""

    job_id: str
    model_dir: Path
    output_dir: Path
    output_display: str  # the output path as the caller named it, for events
    records: tuple[PreferenceRecord, ...]
    config: TrainingConfig


@dataclass(frozen=True)
class CandidatesJob:
    """Everything the candidate-generation Ray task needs for one job."""

    job_id: str
    model_dir: Path
    reward_model_dir: Path
    output_file: Path
    output_display: str
    config: CandidatesConfig


@dataclass
class Job:
    """A job's state as the store keeps it, persisted as JSON. `events` are the JSON event records workers
    sent ({"kind": "step" | "checkpoint" | "progress" | "saved" | "state" | ..., ...})."""

    job_id: str
    kind: JobKind
    state: JobState = JobState.PENDING
    error: str = ""
    created_at: float = field(default_factory=time.time)
    finished_at: float = 0.0
    output_path: str = ""
    latest: dict = field(default_factory=dict)  # latest step metrics
    progress: float = 0.0
    last_checkpoint_step: int = 0
    events: list[dict] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state.finished

    @classmethod
    def from_json(cls, text: str) -> Job:
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        job = cls(**{key: value for key, value in raw.items() if key in known})
        job.kind, job.state = JobKind(job.kind), JobState(job.state)
        return job


Listener = Callable[[Job, dict | None], None]  # (job snapshot, event or None for a state change)


class JobStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, Job] = {}
        self._listeners: dict[str, list[Listener]] = {}
        self._lock = threading.RLock()
        self._recover()

    def _recover(self) -> None:
        for path in sorted(self.directory.glob("*.json")):
            try:
                job = Job.from_json(path.read_text())
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                log.warning("ignoring unreadable job file %s: %s", path.name, exc)
                continue
            if not job.finished:
                checkpoint = (
                    f" (last checkpoint at step {job.last_checkpoint_step})"
                    if job.last_checkpoint_step
                    else ""
                )
                job.error = (
                    f"the rrhf service restarted while the job was {job.state}{checkpoint}; start it again"
                )
                job.state, job.finished_at = JobState.FAILED, time.time()
                self._write(job)
            self._jobs[job.job_id] = job

    def _write(self, job: Job) -> None:
        write_file_atomically(self.directory / f"{job.job_id}.json", json.dumps(asdict(job)))

    def create(self, kind: JobKind, output_path: str) -> Job:
        job = Job(job_id=uuid.uuid4().hex[:12], kind=JobKind(kind), output_path=output_path)
        with self._lock:
            self._jobs[job.job_id] = job
            self._write(job)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise NotFound(
                    f"no job {job_id!r}; ListJobs shows the known jobs", metadata={"job_id": job_id}
                )
            return self._jobs[job_id]

    def list(self, state: JobState | None = None) -> list[Job]:
        with self._lock:
            jobs = [j for j in self._jobs.values() if state is None or j.state == state]
        return sorted(jobs, key=lambda j: j.created_at, reverse=True)

    def update(self, job_id: str, event: dict | None = None, **changes) -> Job:
        if "state" in changes:
            changes["state"] = JobState(changes["state"])
        with self._lock:
            job = self._jobs[job_id]
            if job.finished and changes.get("state") not in (None, job.state):
                return job  # a final state is final
            for key, value in changes.items():
                setattr(job, key, value)
            if event is not None:
                job.events.append(event)
                del job.events[:-MAX_EVENTS_KEPT]
            if job.finished and "state" in changes:
                job.finished_at = time.time()
            self._write(job)
            listeners = list(self._listeners.get(job_id, ()))
        for listener in listeners:
            listener(job, event)
        return job

    def subscribe(self, job_id: str, listener: Listener) -> Job:
        with self._lock:
            job = self.get(job_id)
            self._listeners.setdefault(job_id, []).append(listener)
            return job

    def unsubscribe(self, job_id: str, listener: Listener) -> None:
        with self._lock:
            listeners = self._listeners.get(job_id, [])
            if listener in listeners:
                listeners.remove(listener)
