"""Conversions between RRHF protos and core/service objects."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from services.rrhf.jobs import Job, JobKind, JobState
from wombat.rrhf.v1 import rrhf_pb2 as pb
from wombat_core.errors import InvalidArgument
from wombat_core.rrhf.candidates import CandidateMethod, CandidatesConfig
from wombat_core.rrhf.training import Precision, Strategy, TrainingConfig

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
                "checkpoint_every_steps", "sft_padded_mean", "bos_per_segment", "alpaca_prompt")  # fmt: skip
    values = {name: getattr(h, name) for name in optional if h.HasField(name)}
    if h.strategy not in STRATEGIES:
        raise InvalidArgument(f"hyperparameters.strategy {h.strategy} is not a known Strategy value")
    if h.precision not in PRECISIONS:
        raise InvalidArgument(f"hyperparameters.precision {h.precision} is not a known Precision value")
    if STRATEGIES[h.strategy] is not None:
        values["strategy"] = STRATEGIES[h.strategy]
    return TrainingConfig(**values, precision=PRECISIONS[h.precision])


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
    kind = (event or {}).get("kind", "state")  # None: a change without an event record
    if kind == "step":
        return pb.WatchJobResponse(job_id=j.job_id, step=step_metrics(event))
    if kind == "checkpoint":
        return pb.WatchJobResponse(
            job_id=j.job_id, checkpoint=pb.CheckpointSaved(step=event["step"], path=j.output_path)
        )
    if kind == "state":
        return pb.WatchJobResponse(job_id=j.job_id, job=job(j))
    return None
