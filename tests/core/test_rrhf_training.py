"""Plain-torch RRHF training on the shipped preference data: the loss falls and ranking agreement rises."""

from __future__ import annotations

import math
import re
from importlib import resources

import pytest
import torch

from tests.engine_fixtures import save_servable_tiny_model
from wombat_core.rrhf.data import load_jsonl
from wombat_core.rrhf.training import (
    TrainingConfig,
    build_optimizer,
    evaluate_loss,
    learning_rate,
    plan,
    rank_agreement,
    record_indices,
    train_step,
)
from wombat_core.tokenizer import load_tokenizer

SHIPPED = resources.files("wombat_core.rrhf") / "data" / "preferences.jsonl"


def test_shipped_data_is_valid():
    records = load_jsonl(SHIPPED)
    assert len(records) == 32 and all(len(r.responses) == 4 == len(r.scores) for r in records)


def test_training_lowers_the_loss_and_raises_rank_agreement(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = save_servable_tiny_model(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir, padding_side="right")
    records = load_jsonl(SHIPPED)
    config = TrainingConfig(learning_rate=1e-2, epochs=4, batch_size=4, gradient_accumulation_steps=1, seed=0)
    steps = plan(config, len(records))
    optimizer = build_optimizer(model, config)
    loss_before, agreement_before = (
        evaluate_loss(model, tokenizer, records, config),
        rank_agreement(model, tokenizer, records, config),
    )
    for step in range(steps.total_steps):
        train_step(model, optimizer, tokenizer, records, config, step, steps.total_steps)
    loss_after, agreement_after = (
        evaluate_loss(model, tokenizer, records, config),
        rank_agreement(model, tokenizer, records, config),
    )
    assert loss_after < loss_before * 0.9, (loss_before, loss_after)
    assert agreement_after > agreement_before + 0.1, (agreement_before, agreement_after)


def test_data_order_is_a_deterministic_partition():
    config = TrainingConfig(num_workers=2, batch_size=2, gradient_accumulation_steps=1, epochs=2)
    steps = plan(config, 10)
    assert steps.steps_per_epoch == 2 and steps.total_steps == 4
    epoch0 = [i for s in range(2) for r in range(2) for m in record_indices(config, 10, s, r) for i in m]
    assert len(set(epoch0)) == 8  # no record seen twice within an epoch
    assert record_indices(config, 10, 3, 1) == record_indices(config, 10, 3, 1)
    assert record_indices(config, 10, 0, 0) != record_indices(config, 10, 2, 0)  # reshuffled per epoch


@pytest.mark.parametrize(
    ("scheduler", "warmup"), [("cosine", {"warmup_ratio": 0.03}), ("cosine", {"warmup_steps": 7}),
                              ("linear", {"warmup_ratio": 0.1}), ("linear", {"warmup_ratio": 0.0})],
)  # fmt: skip
def test_schedule_is_the_hf_trainers(scheduler, warmup):
    """The learning rate of every step equals transformers' own scheduler driven the Trainer's way."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    total = 100
    config = TrainingConfig(learning_rate=2e-5, scheduler=scheduler, **warmup)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    make = get_cosine_schedule_with_warmup if scheduler == "cosine" else get_linear_schedule_with_warmup
    # The Trainer's rule for the warm-up: warmup_steps if set, else ceil(warmup_ratio * total).
    warm = warmup.get("warmup_steps") or math.ceil(warmup.get("warmup_ratio", 0) * total)
    reference = make(optimizer, num_warmup_steps=warm, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert [learning_rate(config, s, total) for s in range(total)] == pytest.approx(
        expected, rel=1e-12, abs=1e-15
    )
    assert expected[0] == 0 if warm else expected[0] == config.learning_rate


def test_defaults_are_the_reference_recipe():
    config = TrainingConfig()
    assert (config.strategy, config.weight_decay, config.max_grad_norm, config.scheduler) == (
        "fsdp",
        0,
        1.0,
        "cosine",
    )
    assert (config.warmup_ratio, config.batch_size, config.gradient_accumulation_steps) == (0.03, 1, 8)
    assert (config.learning_rate, config.epochs, config.model_max_length) == (2e-5, 3, 512)
    assert TrainingConfig(num_workers=8).global_batch == 64  # the Wombat run: 8 GPUs x 1 x 8


def test_changing_workers_keeps_the_global_batch():
    config = TrainingConfig(num_workers=2, gradient_accumulation_steps=4)
    assert config.with_workers(1).gradient_accumulation_steps == 8
    assert config.with_workers(8).gradient_accumulation_steps == 1
    assert config.with_workers(4).global_batch == config.global_batch
    from wombat_core.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="divides 8"):
        config.with_workers(3)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("learning_rate", 0.0, "learning_rate must be in (0, 1]"),
        ("epochs", 0, "epochs must be in [1, 1000]"),
        ("strategy", "zero3", "strategy must be ddp or fsdp"),
        ("scheduler", "constant", "scheduler must be cosine or linear"),
        ("max_grad_norm", -1.0, "max_grad_norm must be >= 0"),
        ("warmup_ratio", 1.0, "warmup_ratio must be in [0, 1)"),
        ("weight_decay", 2.0, "weight_decay must be in [0, 1]"),
        ("keep_checkpoints", 0, "keep_checkpoints must be in [1, 100]"),
        ("precision", "fp8", "precision must be fp32 or bf16"),
        ("num_workers", 0, "num_workers must be in [1, 1024]"),
    ],  # fmt: skip
)
def test_training_config_validation(field, value, message):
    from wombat_core.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=re.escape(message)):
        TrainingConfig(**{field: value})
