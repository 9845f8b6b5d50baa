"""The events of RRHF jobs, as frozen dataclasses.

Workers emit them, the service's job store appends them to the job's log (one JSON object per line, with
its `kind`), and WatchJob turns them into stream messages. `to_record` / `from_record` are the only
place an event meets its JSON form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class WorkerStarted:
    kind: ClassVar[str] = "worker"
    rank: int
    pid: int


@dataclass(frozen=True)
class Resumed:
    """The run continued from a checkpoint."""

    kind: ClassVar[str] = "resumed"
    step: int
    saved_by_workers: int  # the layout that saved it; DCP resharded it to this run's
    num_workers: int


@dataclass(frozen=True)
class StepFinished:
    kind: ClassVar[str] = "step"
    step: int  # 1-based, after the step
    total_steps: int
    epoch: int
    loss: float
    rank_loss: float
    sft_loss: float
    learning_rate: float
    samples_per_second: float
    grad_norm: float
    world_size: int
    finished_at: float


@dataclass(frozen=True)
class CheckpointSaved:
    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str  # relative to the model root


@dataclass(frozen=True)
class TrainingStopped:
    """Every worker stopped at `step` because the job was cancelled."""

    kind: ClassVar[str] = "cancelled"
    step: int


@dataclass(frozen=True)
class CandidatesProgress:
    kind: ClassVar[str] = "progress"
    done: int
    total: int


@dataclass(frozen=True)
class OutputSaved:
    """The job's output (a model directory or a JSONL file) is complete, with its manifest."""

    kind: ClassVar[str] = "saved"
    path: str


@dataclass(frozen=True)
class StateChanged:
    kind: ClassVar[str] = "state"
    state: str
    error: str = ""


JobEvent = (
    WorkerStarted | Resumed | StepFinished | CheckpointSaved | TrainingStopped | CandidatesProgress | OutputSaved
    | StateChanged
)  # fmt: skip
EVENT_TYPES: dict[str, type] = {
    cls.kind: cls
    for cls in (
        WorkerStarted,
        Resumed,
        StepFinished,
        CheckpointSaved,
        TrainingStopped,
        CandidatesProgress,
        OutputSaved,
        StateChanged,
    )  # fmt: skip
}


def to_record(event: JobEvent) -> dict:
    return {"kind": event.kind, **dataclasses.asdict(event)}


def from_record(record: dict) -> JobEvent:
    """The event a record holds. Fields this version does not know (from a newer writer) are dropped."""
    cls = EVENT_TYPES[record["kind"]]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in record.items() if key in names})
