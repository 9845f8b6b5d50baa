"""Conversions between RRHF protos and core/service objects."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from services.rrhf.jobs import Job, JobKind, JobState
from wombat.rrhf.v1 import rrhf_pb2 as pb
from wombat_core.errors import InvalidArgument
from wombat_core.rrhf.candidates import CandidateMethod, CandidatesConfig
from wombat_core.rrhf.events import CheckpointSaved, JobEvent, StateChanged, StepFinished
from wombat_core.rrhf.memory_plan import MemoryPlan
from wombat_core.rrhf.training import Precision, Scheduler, Strategy, TrainingConfig

STATES = {
    JobState.PENDING: pb.JOB_STATE_PENDING,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
STATE_NAMES = {v: k for k, v in STATES.items()}
KINDS = {JobKind.TRAINING: pb.JOB_KIND_TRAINING, JobKind.CANDIDATES: pb.JOB_KIND_CANDIDATES}
METHODS = {
    pb.SCORING_METHOD_UNSPECIFIED: "policy_logprob",
    pb.SCORING_METHOD_POLICY_LOGPROB: "policy_logprob",
    pb.SCORING_METHOD_REWARD_MODEL: "reward_model",
}
STRATEGIES = {pb.STRATEGY_UNSPECIFIED: None, pb.STRATEGY_DDP: Strategy.DDP, pb.STRATEGY_FSDP: Strategy.FSDP}
PRECISIONS = {
    pb.PRECISION_UNSPECIFIED: None,
    pb.PRECISION_FP32: Precision.FP32,
    pb.PRECISION_BF16: Precision.BF16,
}
SCHEDULERS = {
    pb.SCHEDULER_UNSPECIFIED: None,
    pb.SCHEDULER_COSINE: Scheduler.COSINE,
    pb.SCHEDULER_LINEAR: Scheduler.LINEAR,
}
CANDIDATE_METHODS = {
    pb.CANDIDATE_METHOD_UNSPECIFIED: CandidateMethod.DIVERSE_BEAM_SEARCH,
    pb.CANDIDATE_METHOD_DIVERSE_BEAM_SEARCH: CandidateMethod.DIVERSE_BEAM_SEARCH,
    pb.CANDIDATE_METHOD_SAMPLING: CandidateMethod.SAMPLING,
}


def job_state(value: int) -> JobState:
    if value not in STATE_NAMES:
        raise InvalidArgument(f"state {value} is not a known JobState value")
    return STATE_NAMES[value]


def scoring_method(value: int) -> str:
    if value not in METHODS:
        raise InvalidArgument(f"options.method {value} is not a known ScoringMethod value")
    return METHODS[value]


def training_config(h: pb.TrainingHyperparameters) -> TrainingConfig:
    """Unset optional fields keep TrainingConfig's defaults; validation happens there, once."""
    optional = ("learning_rate", "epochs", "batch_size", "rrhf_weight", "length_penalty", "model_max_length",
                "warmup_steps", "gradient_accumulation_steps", "num_workers", "seed", "max_steps",
                "checkpoint_every_steps", "sft_padded_mean", "bos_per_segment", "alpaca_prompt", "weight_decay",
                "max_grad_norm", "warmup_ratio", "gradient_checkpointing", "keep_checkpoints")  # fmt: skip
    values = {name: getattr(h, name) for name in optional if h.HasField(name)}
    for name, table in (("strategy", STRATEGIES), ("precision", PRECISIONS), ("scheduler", SCHEDULERS)):
        value = getattr(h, name)
        if value not in table:
            raise InvalidArgument(f"hyperparameters.{name} {value} is not a known {name.title()} value")
        if table[value] is not None:
            values[name] = table[value]
    return TrainingConfig(**values)


def candidates_config(request: pb.GenerateCandidatesRequest) -> CandidatesConfig:
    """Unset optional fields keep CandidatesConfig's defaults; validation happens there, once."""
    if request.method not in CANDIDATE_METHODS:
        raise InvalidArgument(f"method {request.method} is not a known CandidateMethod value")
    values = {name: getattr(request, name) for name in ("num_candidates", "max_new_tokens", "seed")
              if request.HasField(name)}  # fmt: skip
    return CandidatesConfig(tuple(request.queries), method=CANDIDATE_METHODS[request.method], **values)


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    if seconds:
        stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def step_metrics(m: StepFinished) -> pb.StepMetrics:
    return pb.StepMetrics(step=m.step, total_steps=m.total_steps, epoch=m.epoch, loss=m.loss, rank_loss=m.rank_loss,
                          sft_loss=m.sft_loss, learning_rate=m.learning_rate,
                          samples_per_second=m.samples_per_second, grad_norm=m.grad_norm)  # fmt: skip


def job(j: Job) -> pb.Job:
    message = pb.Job(
        job_id=j.job_id,
        kind=KINDS[j.kind],
        state=STATES[j.state],
        error=j.error,
        output_path=j.output_path,
        progress=j.progress,
        last_checkpoint_step=j.last_checkpoint_step,
        attempts=j.attempts,
    )
    message.created_at.CopyFrom(_timestamp(j.created_at))
    if j.finished_at:
        message.finished_at.CopyFrom(_timestamp(j.finished_at))
    if j.latest is not None:
        message.latest.CopyFrom(step_metrics(j.latest))
    return message


def watch_event(j: Job, event: JobEvent) -> pb.WatchJobResponse | None:
    """The stream message for one job event; None for events that are not part of the public stream."""
    if isinstance(event, StepFinished):
        return pb.WatchJobResponse(job_id=j.job_id, step=step_metrics(event))
    if isinstance(event, CheckpointSaved):
        return pb.WatchJobResponse(
            job_id=j.job_id, checkpoint=pb.CheckpointSaved(step=event.step, path=event.path)
        )
    if isinstance(event, StateChanged):
        return pb.WatchJobResponse(job_id=j.job_id, job=job(j))
    return None


def memory_plan(plan: MemoryPlan) -> pb.MemoryPlan:
    return pb.MemoryPlan(items=[pb.MemoryPlanItem(name=name, bytes=size) for name, size in plan.items],
                         per_device_bytes=plan.per_device_bytes, device_memory_bytes=plan.device_memory_bytes,
                         fits=plan.fits, parameters=plan.parameters, workers=plan.workers, device=plan.device,
                         host_load_bytes=plan.host_load_bytes, suggestion=plan.suggestion)  # fmt: skip
