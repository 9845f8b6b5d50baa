"""RRHF training in plain torch: the config, the data order, the learning-rate schedule and one optimiser
step. Ray Train (services/rrhf/train_worker.py) only distributes this and adds checkpoints and reports."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
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
    BF16 = "bf16"  # bfloat16 autocast, as Wombat was trained


@dataclass(frozen=True)
class TrainingConfig:
    """Defaults are Wombat's where the paper gives them (lr 2e-5, 3 epochs, rrhf_weight 1)."""

    learning_rate: float = 2e-5
    epochs: int = 3
    batch_size: int = 1  # queries per worker per micro-step (the reference uses 1)
    rrhf_weight: float = 1.0
    length_penalty: float = 1.0
    model_max_length: int = 512
    warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    num_workers: int = 1
    strategy: Strategy = Strategy.DDP
    precision: Precision | None = None  # None: by device, bf16 on GPU (as Wombat) and fp32 on CPU
    seed: int = 42
    max_steps: int | None = None
    checkpoint_every_steps: int | None = None  # None: once per epoch
    sft_padded_mean: bool = True
    bos_per_segment: bool = True
    alpaca_prompt: bool = False

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise InvalidArgument(message, metadata={"field": message.split(" ", 1)[0]})

        if not (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 1):
            fail(f"learning_rate must be in (0, 1], got {self.learning_rate}")
        for name, low, high in (("epochs", 1, 1000), ("batch_size", 1, 1024), ("gradient_accumulation_steps", 1, 1024),
                                ("num_workers", 1, 1024), ("model_max_length", 2, 1 << 20)):  # fmt: skip
            value = getattr(self, name)
            if not low <= value <= high:
                fail(f"{name} must be in [{low}, {high}], got {value}")
        if self.warmup_steps < 0:
            fail(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            fail(f"max_steps must be >= 1, got {self.max_steps}")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            fail(f"checkpoint_every_steps must be >= 1, got {self.checkpoint_every_steps}")
        if self.strategy not in tuple(Strategy):
            fail(f"strategy must be ddp or fsdp, got {self.strategy}")
        if self.precision is not None and self.precision not in tuple(Precision):
            fail(f"precision must be fp32 or bf16, got {self.precision}")
        # Plain strings from callers become the enums, so equality and JSON behave the same either way.
        object.__setattr__(self, "strategy", Strategy(self.strategy))
        if self.precision is not None:
            object.__setattr__(self, "precision", Precision(self.precision))
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

    def for_device(self, use_gpu: bool) -> TrainingConfig:
        """This config with the precision decided: the one asked for, else bf16 on GPU and fp32 on CPU."""
        return replace(self, precision=self.precision or (Precision.BF16 if use_gpu else Precision.FP32))

    def as_dict(self) -> dict:
        return asdict(self)


def load_for_training(model_dir: Path) -> tuple[torch.nn.Module, object]:
    """The model (float32 master weights) and tokenizer a training worker starts from. Padding follows the
    one RRHF policy (wombat_core.rrhf.collate): no [PAD] token is added, the vocabulary keeps its size."""
    from transformers import AutoModelForCausalLM

    from wombat_core.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    return model, load_tokenizer(model_dir, padding_side="right")


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


def learning_rate(config: TrainingConfig, step: int, total_steps: int) -> float:
    """Linear warm-up, then linear decay to 0 (the Hugging Face Trainer's default schedule)."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    remaining = max(1, total_steps - config.warmup_steps)
    return config.learning_rate * max(0.0, (total_steps - step) / remaining)


@dataclass(frozen=True)
class StepResult:
    step: int  # 1-based, after the step
    loss: float
    rank_loss: float
    sft_loss: float
    learning_rate: float
    samples_per_second: float
    epoch: int


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
    """One optimiser step (all micro-batches). Losses are averaged over the queries of the step."""
    started = time.perf_counter()
    lr = learning_rate(config, step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    device = next(model.parameters()).device
    precision = config.for_device(device.type == "cuda").precision
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision is Precision.BF16 else nullcontext()
    )
    micro_batches = record_indices(config, len(records), step, rank)
    queries = sum(len(m) for m in micro_batches)
    totals = torch.zeros(3)
    for micro in micro_batches:
        for index in micro:
            group = collate_record(tokenizer, records[index], config.collation, where=f"record {index + 1}")
            with autocast:
                parts = compute_loss(model, group, config.loss)
            (parts.loss / queries).backward()
            totals += torch.tensor(
                [float(parts.loss.detach()), float(parts.rank_loss.detach()), float(parts.sft_loss.detach())]
            )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    loss, rank_loss, sft = (totals / queries).tolist()
    epoch = step // plan(config, len(records)).steps_per_epoch
    return StepResult(step + 1, loss, rank_loss, sft, lr, queries / elapsed, epoch)


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
