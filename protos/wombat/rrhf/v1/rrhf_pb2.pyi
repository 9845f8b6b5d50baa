import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoringMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORING_METHOD_UNSPECIFIED: _ClassVar[ScoringMethod]
    SCORING_METHOD_POLICY_LOGPROB: _ClassVar[ScoringMethod]
    SCORING_METHOD_REWARD_MODEL: _ClassVar[ScoringMethod]

class Strategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRATEGY_UNSPECIFIED: _ClassVar[Strategy]
    STRATEGY_DDP: _ClassVar[Strategy]
    STRATEGY_FSDP: _ClassVar[Strategy]

class Scheduler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEDULER_UNSPECIFIED: _ClassVar[Scheduler]
    SCHEDULER_COSINE: _ClassVar[Scheduler]
    SCHEDULER_LINEAR: _ClassVar[Scheduler]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FP32: _ClassVar[Precision]
    PRECISION_BF16: _ClassVar[Precision]

class CandidateMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANDIDATE_METHOD_UNSPECIFIED: _ClassVar[CandidateMethod]
    CANDIDATE_METHOD_DIVERSE_BEAM_SEARCH: _ClassVar[CandidateMethod]
    CANDIDATE_METHOD_SAMPLING: _ClassVar[CandidateMethod]

class JobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_KIND_UNSPECIFIED: _ClassVar[JobKind]
    JOB_KIND_TRAINING: _ClassVar[JobKind]
    JOB_KIND_CANDIDATES: _ClassVar[JobKind]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_PENDING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
SCORING_METHOD_UNSPECIFIED: ScoringMethod
SCORING_METHOD_POLICY_LOGPROB: ScoringMethod
SCORING_METHOD_REWARD_MODEL: ScoringMethod
STRATEGY_UNSPECIFIED: Strategy
STRATEGY_DDP: Strategy
STRATEGY_FSDP: Strategy
SCHEDULER_UNSPECIFIED: Scheduler
SCHEDULER_COSINE: Scheduler
SCHEDULER_LINEAR: Scheduler
PRECISION_UNSPECIFIED: Precision
PRECISION_FP32: Precision
PRECISION_BF16: Precision
CANDIDATE_METHOD_UNSPECIFIED: CandidateMethod
CANDIDATE_METHOD_DIVERSE_BEAM_SEARCH: CandidateMethod
CANDIDATE_METHOD_SAMPLING: CandidateMethod
JOB_KIND_UNSPECIFIED: JobKind
JOB_KIND_TRAINING: JobKind
JOB_KIND_CANDIDATES: JobKind
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_PENDING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class ScoringOptions(_message.Message):
    __slots__ = ("method", "model_path", "length_penalty", "alpaca_prompt")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    ALPACA_PROMPT_FIELD_NUMBER: _ClassVar[int]
    method: ScoringMethod
    model_path: str
    length_penalty: float
    alpaca_prompt: bool
    def __init__(self, method: _Optional[_Union[ScoringMethod, str]] = ..., model_path: _Optional[str] = ..., length_penalty: _Optional[float] = ..., alpaca_prompt: _Optional[bool] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("query", "responses", "options", "queries")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    query: str
    responses: _containers.RepeatedScalarFieldContainer[str]
    options: ScoringOptions
    queries: _containers.RepeatedCompositeFieldContainer[ScoreQuery]
    def __init__(self, query: _Optional[str] = ..., responses: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[ScoringOptions, _Mapping]] = ..., queries: _Optional[_Iterable[_Union[ScoreQuery, _Mapping]]] = ...) -> None: ...

class ScoreQuery(_message.Message):
    __slots__ = ("query", "responses")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    query: str
    responses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, query: _Optional[str] = ..., responses: _Optional[_Iterable[str]] = ...) -> None: ...

class QueryScores(_message.Message):
    __slots__ = ("scores", "ranking")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    ranking: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., ranking: _Optional[_Iterable[int]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "ranking", "results")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    ranking: _containers.RepeatedScalarFieldContainer[int]
    results: _containers.RepeatedCompositeFieldContainer[QueryScores]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., ranking: _Optional[_Iterable[int]] = ..., results: _Optional[_Iterable[_Union[QueryScores, _Mapping]]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("query", "responses", "options")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    query: str
    responses: _containers.RepeatedScalarFieldContainer[str]
    options: ScoringOptions
    def __init__(self, query: _Optional[str] = ..., responses: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[ScoringOptions, _Mapping]] = ...) -> None: ...

class RankedResponse(_message.Message):
    __slots__ = ("index", "response", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    response: str
    score: float
    def __init__(self, index: _Optional[int] = ..., response: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("ranked",)
    RANKED_FIELD_NUMBER: _ClassVar[int]
    ranked: _containers.RepeatedCompositeFieldContainer[RankedResponse]
    def __init__(self, ranked: _Optional[_Iterable[_Union[RankedResponse, _Mapping]]] = ...) -> None: ...

class PreferenceRecord(_message.Message):
    __slots__ = ("query", "responses", "scores")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    query: str
    responses: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, query: _Optional[str] = ..., responses: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class PreferenceRecords(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[PreferenceRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[PreferenceRecord, _Mapping]]] = ...) -> None: ...

class TrainingHyperparameters(_message.Message):
    __slots__ = ("learning_rate", "epochs", "batch_size", "rrhf_weight", "length_penalty", "model_max_length", "warmup_steps", "gradient_accumulation_steps", "num_workers", "strategy", "precision", "seed", "max_steps", "checkpoint_every_steps", "sft_padded_mean", "bos_per_segment", "alpaca_prompt", "weight_decay", "max_grad_norm", "scheduler", "warmup_ratio", "gradient_checkpointing", "keep_checkpoints")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RRHF_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MODEL_MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    SFT_PADDED_MEAN_FIELD_NUMBER: _ClassVar[int]
    BOS_PER_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    ALPACA_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    WARMUP_RATIO_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    KEEP_CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    epochs: int
    batch_size: int
    rrhf_weight: float
    length_penalty: float
    model_max_length: int
    warmup_steps: int
    gradient_accumulation_steps: int
    num_workers: int
    strategy: Strategy
    precision: Precision
    seed: int
    max_steps: int
    checkpoint_every_steps: int
    sft_padded_mean: bool
    bos_per_segment: bool
    alpaca_prompt: bool
    weight_decay: float
    max_grad_norm: float
    scheduler: Scheduler
    warmup_ratio: float
    gradient_checkpointing: bool
    keep_checkpoints: int
    def __init__(self, learning_rate: _Optional[float] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., rrhf_weight: _Optional[float] = ..., length_penalty: _Optional[float] = ..., model_max_length: _Optional[int] = ..., warmup_steps: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., num_workers: _Optional[int] = ..., strategy: _Optional[_Union[Strategy, str]] = ..., precision: _Optional[_Union[Precision, str]] = ..., seed: _Optional[int] = ..., max_steps: _Optional[int] = ..., checkpoint_every_steps: _Optional[int] = ..., sft_padded_mean: _Optional[bool] = ..., bos_per_segment: _Optional[bool] = ..., alpaca_prompt: _Optional[bool] = ..., weight_decay: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., scheduler: _Optional[_Union[Scheduler, str]] = ..., warmup_ratio: _Optional[float] = ..., gradient_checkpointing: _Optional[bool] = ..., keep_checkpoints: _Optional[int] = ...) -> None: ...

class StartTrainingRequest(_message.Message):
    __slots__ = ("model_path", "data_path", "records", "hyperparameters", "output_path", "use_gpu")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_PATH_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    USE_GPU_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    data_path: str
    records: PreferenceRecords
    hyperparameters: TrainingHyperparameters
    output_path: str
    use_gpu: bool
    def __init__(self, model_path: _Optional[str] = ..., data_path: _Optional[str] = ..., records: _Optional[_Union[PreferenceRecords, _Mapping]] = ..., hyperparameters: _Optional[_Union[TrainingHyperparameters, _Mapping]] = ..., output_path: _Optional[str] = ..., use_gpu: _Optional[bool] = ...) -> None: ...

class PlanTrainingRequest(_message.Message):
    __slots__ = ("model_path", "hyperparameters", "use_gpu", "device_memory_gb", "responses_per_query", "sequence_length")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    USE_GPU_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_PER_QUERY_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    hyperparameters: TrainingHyperparameters
    use_gpu: bool
    device_memory_gb: float
    responses_per_query: int
    sequence_length: int
    def __init__(self, model_path: _Optional[str] = ..., hyperparameters: _Optional[_Union[TrainingHyperparameters, _Mapping]] = ..., use_gpu: _Optional[bool] = ..., device_memory_gb: _Optional[float] = ..., responses_per_query: _Optional[int] = ..., sequence_length: _Optional[int] = ...) -> None: ...

class MemoryPlanItem(_message.Message):
    __slots__ = ("name", "bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    bytes: int
    def __init__(self, name: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class MemoryPlan(_message.Message):
    __slots__ = ("items", "per_device_bytes", "device_memory_bytes", "fits", "parameters", "workers", "device", "host_load_bytes", "suggestion")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PER_DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FITS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOST_LOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    SUGGESTION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[MemoryPlanItem]
    per_device_bytes: int
    device_memory_bytes: int
    fits: bool
    parameters: int
    workers: int
    device: str
    host_load_bytes: int
    suggestion: str
    def __init__(self, items: _Optional[_Iterable[_Union[MemoryPlanItem, _Mapping]]] = ..., per_device_bytes: _Optional[int] = ..., device_memory_bytes: _Optional[int] = ..., fits: _Optional[bool] = ..., parameters: _Optional[int] = ..., workers: _Optional[int] = ..., device: _Optional[str] = ..., host_load_bytes: _Optional[int] = ..., suggestion: _Optional[str] = ...) -> None: ...

class PlanTrainingResponse(_message.Message):
    __slots__ = ("plan",)
    PLAN_FIELD_NUMBER: _ClassVar[int]
    plan: MemoryPlan
    def __init__(self, plan: _Optional[_Union[MemoryPlan, _Mapping]] = ...) -> None: ...

class StartTrainingResponse(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GenerateCandidatesRequest(_message.Message):
    __slots__ = ("model_path", "reward_model_path", "queries", "num_candidates", "method", "max_new_tokens", "output_path", "seed", "use_gpu")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    USE_GPU_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    reward_model_path: str
    queries: _containers.RepeatedScalarFieldContainer[str]
    num_candidates: int
    method: CandidateMethod
    max_new_tokens: int
    output_path: str
    seed: int
    use_gpu: bool
    def __init__(self, model_path: _Optional[str] = ..., reward_model_path: _Optional[str] = ..., queries: _Optional[_Iterable[str]] = ..., num_candidates: _Optional[int] = ..., method: _Optional[_Union[CandidateMethod, str]] = ..., max_new_tokens: _Optional[int] = ..., output_path: _Optional[str] = ..., seed: _Optional[int] = ..., use_gpu: _Optional[bool] = ...) -> None: ...

class GenerateCandidatesResponse(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class StepMetrics(_message.Message):
    __slots__ = ("step", "total_steps", "epoch", "loss", "rank_loss", "sft_loss", "learning_rate", "samples_per_second", "grad_norm")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    RANK_LOSS_FIELD_NUMBER: _ClassVar[int]
    SFT_LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    epoch: int
    loss: float
    rank_loss: float
    sft_loss: float
    learning_rate: float
    samples_per_second: float
    grad_norm: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., epoch: _Optional[int] = ..., loss: _Optional[float] = ..., rank_loss: _Optional[float] = ..., sft_loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., samples_per_second: _Optional[float] = ..., grad_norm: _Optional[float] = ...) -> None: ...

class CheckpointSaved(_message.Message):
    __slots__ = ("step", "path")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    step: int
    path: str
    def __init__(self, step: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "kind", "state", "error", "created_at", "finished_at", "output_path", "latest", "progress", "last_checkpoint_step", "attempts")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kind: JobKind
    state: JobState
    error: str
    created_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    output_path: str
    latest: StepMetrics
    progress: float
    last_checkpoint_step: int
    attempts: int
    def __init__(self, job_id: _Optional[str] = ..., kind: _Optional[_Union[JobKind, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., error: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., output_path: _Optional[str] = ..., latest: _Optional[_Union[StepMetrics, _Mapping]] = ..., progress: _Optional[float] = ..., last_checkpoint_step: _Optional[int] = ..., attempts: _Optional[int] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("job_id", "step", "checkpoint", "job")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step: StepMetrics
    checkpoint: CheckpointSaved
    job: Job
    def __init__(self, job_id: _Optional[str] = ..., step: _Optional[_Union[StepMetrics, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointSaved, _Mapping]] = ..., job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ResumeJobRequest(_message.Message):
    __slots__ = ("job_id", "num_workers")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    num_workers: int
    def __init__(self, job_id: _Optional[str] = ..., num_workers: _Optional[int] = ...) -> None: ...

class ResumeJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("state", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
