"""Training and candidate-generation jobs: state persisted per job, run on Ray, watched as event streams.

Each job has two files in the state directory:
  * `<id>.json`, its identity and state, rewritten atomically (with an fsync) only when the state changes;
  * `<id>.events.jsonl`, its events appended one JSON object per line as they arrive (no rewrite, no fsync
    per event: a step event lost in a crash is re-sent by the resumed run).
The latest metrics, the progress and the last checkpoint are derived from the events, so a restarted
service rebuilds them by replaying the log. A job that was running when the service stopped is marked
FAILED with the reason and its last checkpoint; a training job is then resumed by id (ResumeJob,
`wombat train --resume ID`), never silently lost.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from wombat_core.atomic import write_file_atomically
from wombat_core.errors import FailedPrecondition, NotFound
from wombat_core.rrhf.candidates import CandidatesConfig
from wombat_core.rrhf.events import (
    CandidatesProgress,
    CheckpointSaved,
    JobEvent,
    StateChanged,
    StepFinished,
    from_record,
    to_record,
)
from wombat_core.rrhf.trainer import TrainingRun

log = logging.getLogger(__name__)

MAX_EVENTS_KEPT = 2000  # in memory per job; the log file keeps them all


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

    @property
    def resumable(self) -> bool:
        return self in (JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class TrainingJob:
    """Everything a Ray Train worker needs for one training job (Ray pickles it to the workers)."""

    job_id: str
    run: TrainingRun
    use_gpu: bool


@dataclass(frozen=True)
class CandidatesJob:
    """Everything the candidate-generation Ray task needs for one job."""

    job_id: str
    model_dir: Path
    reward_model_dir: Path
    output_file: Path
    output_display: str
    config: CandidatesConfig
    use_gpu: bool


_SNAPSHOT_FIELDS = (
    "job_id",
    "kind",
    "state",
    "error",
    "created_at",
    "finished_at",
    "output_path",
    "attempts",
)


@dataclass
class Job:
    """A job as the store keeps it. The fields after `attempts` are derived from the events."""

    job_id: str
    kind: JobKind
    state: JobState = JobState.PENDING
    error: str = ""
    created_at: float = field(default_factory=time.time)
    finished_at: float = 0.0
    output_path: str = ""
    attempts: int = 1  # 1 + how many times it was resumed
    latest: StepFinished | None = None
    progress: float = 0.0
    last_checkpoint_step: int = 0
    events: list[JobEvent] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state.finished

    def require_resumable(self) -> None:
        if not self.state.resumable:
            raise FailedPrecondition(
                f"job {self.job_id} is {self.state}; only a failed or cancelled job can be resumed",
                metadata={"job_id": self.job_id},
            )

    def apply(self, event: JobEvent) -> None:
        """Folds one event into the derived fields."""
        if isinstance(event, StepFinished):
            self.latest, self.progress = event, event.step / max(1, event.total_steps)
        elif isinstance(event, CandidatesProgress):
            self.progress = event.done / max(1, event.total)
        elif isinstance(event, CheckpointSaved):
            self.last_checkpoint_step = event.step
        elif isinstance(event, StateChanged) and event.state == JobState.SUCCEEDED:
            self.progress = 1.0
        self.events.append(event)
        del self.events[:-MAX_EVENTS_KEPT]

    def snapshot(self) -> str:
        return json.dumps({name: getattr(self, name) for name in _SNAPSHOT_FIELDS})

    @classmethod
    def from_snapshot(cls, text: str) -> Job:
        raw = json.loads(text)
        job = cls(**{name: raw[name] for name in _SNAPSHOT_FIELDS if name in raw})
        job.kind, job.state = JobKind(job.kind), JobState(job.state)
        return job


Listener = Callable[[Job, JobEvent], None]  # (job snapshot, the event just applied)


class JobStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, Job] = {}
        self._listeners: dict[str, list[Listener]] = {}
        self._lock = threading.RLock()
        self._recover()

    def _snapshot_path(self, job_id: str) -> Path:
        return self.directory / f"{job_id}.json"

    def _log_path(self, job_id: str) -> Path:
        return self.directory / f"{job_id}.events.jsonl"

    def _recover(self) -> None:
        for path in sorted(self.directory.glob("*.json")):
            try:
                job = Job.from_snapshot(path.read_text())
            except (json.JSONDecodeError, TypeError, ValueError, KeyError) as exc:
                log.warning("ignoring unreadable job file %s: %s", path.name, exc)
                continue
            for event in self._read_log(job.job_id):
                job.apply(event)
            self._jobs[job.job_id] = job
            if not job.finished:
                checkpoint = (
                    f" (last checkpoint at step {job.last_checkpoint_step})"
                    if job.last_checkpoint_step
                    else ""
                )
                how = (
                    f"resume it with ResumeJob or `wombat train --resume {job.job_id}`"
                    if job.kind is JobKind.TRAINING
                    else "start it again"
                )
                self.set_state(job.job_id, JobState.FAILED,
                               f"the rrhf service restarted while the job was {job.state}{checkpoint}; {how}")  # fmt: skip

    def _read_log(self, job_id: str) -> list[JobEvent]:
        path = self._log_path(job_id)
        if not path.is_file():
            return []
        events = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                events.append(from_record(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                # A crash can cut the last line short; anything else unreadable is skipped with a warning.
                log.warning("job %s: skipping event line %d: %s", job_id, number, exc)
        return events

    def create(self, kind: JobKind, output_path: str) -> Job:
        job = Job(job_id=uuid.uuid4().hex[:12], kind=JobKind(kind), output_path=output_path)
        with self._lock:
            self._jobs[job.job_id] = job
            write_file_atomically(self._snapshot_path(job.job_id), job.snapshot())
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

    def append(self, job_id: str, event: JobEvent) -> Job:
        """Records a worker's event: applied to the job, appended to its log, sent to its watchers."""
        with self._lock:
            job = self.get(job_id)
            job.apply(event)
            with self._log_path(job_id).open("a", encoding="utf-8") as log_file:
                log_file.write(json.dumps(to_record(event)) + "\n")
            listeners = list(self._listeners.get(job_id, ()))
        for listener in listeners:
            listener(job, event)
        return job

    def set_state(self, job_id: str, state: JobState, error: str = "") -> Job:
        """Moves a job to `state`. A final state is final (`reopen` is the one way back)."""
        state = JobState(state)
        with self._lock:
            job = self.get(job_id)
            if job.finished and state != job.state:
                return job
            job.state, job.error = state, error
            if state.finished:
                job.finished_at = time.time()
            write_file_atomically(self._snapshot_path(job_id), job.snapshot())
        return self.append(job_id, StateChanged(state.value, error))

    def reopen(self, job_id: str) -> Job:
        """A failed or cancelled job goes back to PENDING, to be resumed."""
        with self._lock:
            job = self.get(job_id)
            job.require_resumable()
            job.state, job.error, job.finished_at, job.attempts = JobState.PENDING, "", 0.0, job.attempts + 1
            write_file_atomically(self._snapshot_path(job_id), job.snapshot())
        return self.append(job_id, StateChanged(JobState.PENDING.value))

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
