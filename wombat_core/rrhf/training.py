"""RRHF training in plain torch: the config, the data order, the learning-rate schedule and one optimiser
step. `wombat_core.rrhf.trainer` runs the steps on every worker (sharded by `parallel`, checkpointed by
`checkpoints`); Ray Train (services/rrhf/train_worker.py) only starts the workers and relays events."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path

import torch

from wombat_core.errors import InvalidArgument
from wombat_core.rrhf.collate import CollationConfig, collate_record
from wombat_core.rrhf.data import PreferenceRecord
from wombat_core.rrhf.loss import LossConfig, compute_loss


class Strategy(StrEnum):
    DDP = "ddp"
    FSDP = "fsdp"


class Precision(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"  # bfloat16 compute over float32 master weights, as Wombat was trained


class Scheduler(StrEnum):
    COSINE = "cosine"  # the reference recipe's (HF Trainer --lr_scheduler_type cosine)
    LINEAR = "linear"  # the HF Trainer's default


@dataclass(frozen=True)
class TrainingConfig:
    """Defaults are the reference Wombat recipe (train_wombat7b.sh on the HF Trainer): lr 2e-5, 3 epochs,
    FSDP, bf16 on GPUs, weight decay 0, gradient clipping at 1.0, a cosine schedule with 3 % warm-up, one
    query per device per micro-step and 8 micro-steps per optimiser step (an effective batch of 64 on 8
    GPUs), 512 tokens."""

    learning_rate: float = 2e-5
    epochs: int = 3
    batch_size: int = 1  # queries per worker per micro-step (the reference uses 1)
    rrhf_weight: float = 1.0
    length_penalty: float = 1.0
    model_max_length: int = 512
    warmup_steps: int = 0  # > 0 overrides warmup_ratio, as in the HF Trainer
    gradient_accumulation_steps: int = 8
    num_workers: int = 1
    strategy: Strategy = Strategy.FSDP
    precision: Precision | None = None  # None: by device, bf16 on GPU (as Wombat) and fp32 on CPU
    seed: int = 42
    max_steps: int | None = None
    checkpoint_every_steps: int | None = None  # None: once per epoch
    sft_padded_mean: bool = True
    bos_per_segment: bool = True
    alpaca_prompt: bool = False
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    scheduler: Scheduler = Scheduler.COSINE
    warmup_ratio: float = 0.03
    gradient_checkpointing: bool = False
    keep_checkpoints: int = 2  # the newest N checkpoints are kept; older ones are deleted

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise InvalidArgument(message, metadata={"field": message.split(" ", 1)[0]})

        if not (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 1):
            fail(f"learning_rate must be in (0, 1], got {self.learning_rate}")
        for name, low, high in (("epochs", 1, 1000), ("batch_size", 1, 1024), ("gradient_accumulation_steps", 1, 1024),
                                ("num_workers", 1, 1024), ("model_max_length", 2, 1 << 20),
                                ("keep_checkpoints", 1, 100)):  # fmt: skip
            value = getattr(self, name)
            if not low <= value <= high:
                fail(f"{name} must be in [{low}, {high}], got {value}")
        if self.warmup_steps < 0:
            fail(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (math.isfinite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            fail(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay <= 1):
            fail(f"weight_decay must be in [0, 1], got {self.weight_decay}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            fail(f"max_grad_norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm}")
        if self.max_steps is not None and self.max_steps < 1:
            fail(f"max_steps must be >= 1, got {self.max_steps}")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            fail(f"checkpoint_every_steps must be >= 1, got {self.checkpoint_every_steps}")
        for name, enum in (("strategy", Strategy), ("precision", Precision), ("scheduler", Scheduler)):
            value = getattr(self, name)
            if value is None and name == "precision":
                continue
            if value not in tuple(enum):
                fail(f"{name} must be {' or '.join(e.value for e in enum)}, got {value}")
            # Plain strings from callers become the enums, so equality and JSON behave the same either way.
            object.__setattr__(self, name, enum(value))
        if not math.isfinite(self.rrhf_weight) or self.rrhf_weight < 0:
            fail(f"rrhf_weight must be >= 0, got {self.rrhf_weight}")
        if not (math.isfinite(self.length_penalty) and 0 <= self.length_penalty <= 10):
            fail(f"length_penalty must be in [0, 10], got {self.length_penalty}")

    @property
    def loss(self) -> LossConfig:
        return LossConfig(self.rrhf_weight, self.length_penalty, self.sft_padded_mean)

    @property
    def collation(self) -> CollationConfig:
        return CollationConfig(self.model_max_length, self.bos_per_segment, self.alpaca_prompt)

    @property
    def global_batch(self) -> int:
        """Queries per optimiser step, over all workers: what a resumed run must keep."""
        return self.num_workers * self.batch_size * self.gradient_accumulation_steps

    def for_device(self, use_gpu: bool) -> TrainingConfig:
        """This config with the precision decided: the one asked for, else bf16 on GPU and fp32 on CPU."""
        return replace(self, precision=self.precision or (Precision.BF16 if use_gpu else Precision.FP32))

    def with_workers(self, num_workers: int) -> TrainingConfig:
        """This config on `num_workers` workers with the same global batch (so the same data per step and
        the same optimisation): gradient accumulation takes up the difference."""
        if num_workers == self.num_workers:
            return self
        per_worker = num_workers * self.batch_size
        if self.global_batch % per_worker:
            raise InvalidArgument(
                f"num_workers={num_workers} cannot keep the job's global batch of {self.global_batch} queries "
                f"(batch_size {self.batch_size} x gradient_accumulation_steps x workers): choose a worker "
                f"count that divides {self.global_batch // self.batch_size}",
                metadata={"field": "num_workers"},
            )
        return replace(
            self, num_workers=num_workers, gradient_accumulation_steps=self.global_batch // per_worker
        )

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainingConfig:
        return cls(**values)


def load_for_training(model_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object]:
    """The model and tokenizer a training worker starts from, on the CPU (sharding moves it), through the
    one RRHF loader that scoring uses too."""
    from wombat_core.rrhf.loading import load_rrhf_model

    return load_rrhf_model(model_dir, dtype=dtype)


@dataclass(frozen=True)
class Plan:
    steps_per_epoch: int
    total_steps: int


def plan(config: TrainingConfig, num_records: int) -> Plan:
    """Every worker takes the same number of optimiser steps (DDP needs it); the last partial step of an
    epoch is dropped unless it would leave no step at all."""
    per_step = config.num_workers * config.batch_size * config.gradient_accumulation_steps
    steps_per_epoch = max(1, num_records // per_step)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    return Plan(steps_per_epoch, total)


def record_indices(config: TrainingConfig, num_records: int, step: int, rank: int) -> list[list[int]]:
    """Record indices of each micro-batch of `step` (0-based) on worker `rank`: a per-epoch shuffle seeded
    by (seed, epoch), so a resumed run sees exactly the data the uninterrupted run would have."""
    steps = plan(config, num_records)
    epoch, in_epoch = divmod(step, steps.steps_per_epoch)
    order = list(range(num_records))
    random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
    micro = []
    for m in range(config.gradient_accumulation_steps):
        start = (
            (in_epoch * config.gradient_accumulation_steps + m) * config.num_workers + rank
        ) * config.batch_size
        micro.append([order[(start + b) % num_records] for b in range(config.batch_size)])
    return micro


def warmup_steps(config: TrainingConfig, total_steps: int) -> int:
    """The HF Trainer's rule: warmup_steps when set, else ceil(warmup_ratio * total steps)."""
    return config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)


def learning_rate(config: TrainingConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimiser step `step` (0-based): the HF Trainer's schedules exactly
    (get_cosine_schedule_with_warmup / get_linear_schedule_with_warmup), so step 0 of a warm-up runs at 0."""
    warmup = warmup_steps(config, total_steps)
    if step < warmup:
        return config.learning_rate * step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    if config.scheduler is Scheduler.LINEAR:
        return config.learning_rate * max(0.0, 1.0 - progress)
    return config.learning_rate * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW over the parameters the model has *now*. Call it after `parallel.prepare_model`: sharding
    replaces the parameters, and an optimiser built before would step tensors that never get gradients.
    Weight decay skips biases and norm weights (1-D tensors), as the HF Trainer does."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # On CUDA the fused kernel: one launch for every parameter, and none of the foreach path's full-size
    # temporaries (its sqrt of the second moment is a copy of every fp32 shard, +4P/S bytes at the step's
    # peak, measured on an H200). The CPU keeps the foreach path, which gloo-sharded DTensors take everywhere.
    fused = all(p.is_cuda for g in groups for p in g["params"])
    params = [g for g in groups if g["params"]]
    return torch.optim.AdamW(params, lr=config.learning_rate, fused=fused or None)


@dataclass(frozen=True)
class StepResult:
    step: int  # 1-based, after the step
    loss: float  # mean over every query of the step, on all workers
    rank_loss: float
    sft_loss: float
    learning_rate: float
    samples_per_second: float  # queries per second, all workers together
    epoch: int
    grad_norm: float  # before clipping, over the whole model


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer,
    records: Sequence[PreferenceRecord],
    config: TrainingConfig,
    step: int,
    total_steps: int,
    rank: int = 0,
) -> StepResult:
    """One optimiser step (all micro-batches) on this worker; with several workers every worker calls it
    for the same step. Each query's loss is scaled by 1/queries-on-this-worker and DDP/FSDP average the
    gradients over the workers, so the update is the mean over the global batch, whatever the layout."""
    from wombat_core.rrhf import parallel

    started = time.perf_counter()
    lr = learning_rate(config, step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    device = parallel.model_device(model)
    micro_batches = record_indices(config, len(records), step, rank)
    indices = [index for micro in micro_batches for index in micro]
    totals = torch.zeros(4, dtype=torch.float64)
    for position, index in enumerate(indices):
        group = collate_record(tokenizer, records[index], config.collation, where=f"record {index + 1}")
        last = position == len(indices) - 1
        with parallel.gradient_sync(model, enabled=last), parallel.compute_precision(model, config.precision):
            parts = compute_loss(model, group, config.loss)
            (parts.loss / len(indices)).backward()
        values = (parts.loss, parts.rank_loss, parts.sft_loss)
        totals += torch.tensor([*(float(v.detach()) for v in values), 1.0], dtype=torch.float64)
    grad_norm = parallel.clip_grad_norm(model, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    totals = parallel.all_reduce_sum(totals, device)  # the step's losses over every worker's queries
    elapsed = time.perf_counter() - started
    queries = float(totals[3])
    loss, rank_loss, sft = (totals[:3] / queries).tolist()
    epoch = step // plan(config, len(records)).steps_per_epoch
    return StepResult(step + 1, loss, rank_loss, sft, lr, queries / elapsed, epoch, grad_norm)


def evaluate_loss(
    model: torch.nn.Module, tokenizer, records: Sequence[PreferenceRecord], config: TrainingConfig
) -> float:
    """Mean RRHF loss over `records`, without gradients."""
    model.eval()
    with torch.no_grad():
        total = sum(
            float(compute_loss(model, collate_record(tokenizer, r, config.collation), config.loss).loss)
            for r in records
        )
    return total / len(records)


def rank_agreement(
    model: torch.nn.Module, tokenizer, records: Sequence[PreferenceRecord], config: TrainingConfig
) -> float:
    """Fraction of response pairs with different rewards that the model's p_i orders the same way."""
    agree = total = 0
    model.eval()
    with torch.no_grad():
        for record in records:
            group = collate_record(tokenizer, record, config.collation)
            p = compute_loss(model, group, config.loss).response_scores
            for i in range(len(record.scores)):
                for j in range(len(record.scores)):
                    if record.scores[i] < record.scores[j]:
                        total += 1
                        agree += int(p[i] < p[j])
    return agree / total if total else 1.0
