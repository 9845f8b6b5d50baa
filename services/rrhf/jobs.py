"""Training and candidate-generation jobs: state persisted per job, run on Ray, watched as event streams.

Each job is a JSON file under the state directory, rewritten atomically on every change, so a restarted
service still knows every job. A job that was running when the service stopped is marked FAILED with
the reason and its last checkpoint (start a new job to continue); it is never silently lost.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wombat_core.errors import NotFound

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")
MAX_EVENTS_KEPT = 2000


@dataclass
class Job:
    job_id: str
    kind: str  # "training" | "candidates"
    state: str = "pending"  # pending | running | succeeded | failed | cancelled
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
        return self.state in TERMINAL


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
                job = Job(**json.loads(path.read_text()))
            except (json.JSONDecodeError, TypeError) as exc:
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
                job.state, job.finished_at = "failed", time.time()
                self._write(job)
            self._jobs[job.job_id] = job

    def _write(self, job: Job) -> None:
        path = self.directory / f"{job.job_id}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(job)))
        os.replace(temporary, path)

    def create(self, kind: str, output_path: str) -> Job:
        job = Job(job_id=uuid.uuid4().hex[:12], kind=kind, output_path=output_path)
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

    def list(self, state: str | None = None) -> list[Job]:
        with self._lock:
            jobs = [j for j in self._jobs.values() if state is None or j.state == state]
        return sorted(jobs, key=lambda j: j.created_at, reverse=True)

    def update(self, job_id: str, event: dict | None = None, **changes) -> Job:
        with self._lock:
            job = self._jobs[job_id]
            if job.finished and changes.get("state") not in (None, job.state):
                return job  # a final state is final
            for key, value in changes.items():
                setattr(job, key, value)
            if event is not None:
                job.events.append(event)
                del job.events[:-MAX_EVENTS_KEPT]
            if changes.get("state") in TERMINAL:
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
