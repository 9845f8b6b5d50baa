"""Conversions between RRHF protos and core/service objects."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from services.rrhf.jobs import Job
from wombat.rrhf.v1 import rrhf_pb2 as pb
from wombat_core.errors import InvalidArgument
from wombat_core.rrhf.training import TrainingConfig

STATES = {
    "pending": pb.JOB_STATE_PENDING,
    "running": pb.JOB_STATE_RUNNING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
}
STATE_NAMES = {v: k for k, v in STATES.items()}
KINDS = {"training": pb.JOB_KIND_TRAINING, "candidates": pb.JOB_KIND_CANDIDATES}
METHODS = {
    pb.SCORING_METHOD_UNSPECIFIED: "policy_logprob",
    pb.SCORING_METHOD_POLICY_LOGPROB: "policy_logprob",
    pb.SCORING_METHOD_REWARD_MODEL: "reward_model",
}


def scoring_method(value: int) -> str:
    if value not in METHODS:
        raise InvalidArgument(f"options.method {value} is not a known ScoringMethod value")
    return METHODS[value]


def training_config(h: pb.TrainingHyperparameters) -> TrainingConfig:
    """Unset optional fields keep TrainingConfig's defaults; validation happens there, once."""
    optional = ("learning_rate", "epochs", "batch_size", "rrhf_weight", "length_penalty", "model_max_length",
                "warmup_steps", "gradient_accumulation_steps", "num_workers", "seed", "max_steps",
                "checkpoint_every_steps", "sft_padded_mean", "bos_per_segment")  # fmt: skip
    values = {name: getattr(h, name) for name in optional if h.HasField(name)}
    values["strategy"] = "fsdp" if h.strategy == pb.STRATEGY_FSDP else "ddp"
    values["precision"] = "bf16" if h.precision == pb.PRECISION_BF16 else "fp32"
    if h.strategy not in (pb.STRATEGY_UNSPECIFIED, pb.STRATEGY_DDP, pb.STRATEGY_FSDP):
        raise InvalidArgument(f"hyperparameters.strategy {h.strategy} is not a known Strategy value")
    return TrainingConfig(**values)


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    if seconds:
        stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def step_metrics(m: dict) -> pb.StepMetrics:
    return pb.StepMetrics(
        step=m.get("step", 0),
        total_steps=m.get("total_steps", 0),
        epoch=m.get("epoch", 0),
        loss=m.get("loss", 0.0),
        rank_loss=m.get("rank_loss", 0.0),
        sft_loss=m.get("sft_loss", 0.0),
        learning_rate=m.get("learning_rate", 0.0),
        samples_per_second=m.get("samples_per_second", 0.0),
    )


def job(j: Job) -> pb.Job:
    message = pb.Job(
        job_id=j.job_id,
        kind=KINDS[j.kind],
        state=STATES[j.state],
        error=j.error,
        output_path=j.output_path,
        progress=j.progress,
    )
    message.created_at.CopyFrom(_timestamp(j.created_at))
    if j.finished_at:
        message.finished_at.CopyFrom(_timestamp(j.finished_at))
    if j.latest:
        message.latest.CopyFrom(step_metrics(j.latest))
    return message


def watch_event(j: Job, event: dict | None) -> pb.WatchJobResponse | None:
    """The stream message for one job event; None for events that are not part of the public stream."""
    kind = (event or {}).get("kind", "state")
    if kind == "step":
        return pb.WatchJobResponse(job_id=j.job_id, step=step_metrics(event))
    if kind == "checkpoint":
        return pb.WatchJobResponse(
            job_id=j.job_id, checkpoint=pb.CheckpointSaved(step=event["step"], path=j.output_path)
        )
    if kind == "state":
        return pb.WatchJobResponse(job_id=j.job_id, job=job(j))
    return None
