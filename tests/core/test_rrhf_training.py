"""Plain-torch RRHF training on the shipped preference data: the loss falls and ranking agreement rises."""

from __future__ import annotations

from importlib import resources

import pytest
import torch

from tests.engine_fixtures import save_servable_tiny_model
from wombat_core.rrhf.data import load_jsonl
from wombat_core.rrhf.training import (
    TrainingConfig,
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
    config = TrainingConfig(learning_rate=1e-2, epochs=4, batch_size=4, seed=0)
    steps = plan(config, len(records))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
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
    config = TrainingConfig(num_workers=2, batch_size=2, epochs=2)
    steps = plan(config, 10)
    assert steps.steps_per_epoch == 2 and steps.total_steps == 4
    epoch0 = [i for s in range(2) for r in range(2) for m in record_indices(config, 10, s, r) for i in m]
    assert len(set(epoch0)) == 8  # no record seen twice within an epoch
    assert record_indices(config, 10, 3, 1) == record_indices(config, 10, 3, 1)
    assert record_indices(config, 10, 0, 0) != record_indices(config, 10, 2, 0)  # reshuffled per epoch


def test_schedule_warms_up_then_decays():
    config = TrainingConfig(learning_rate=1e-3, warmup_steps=2)
    assert [round(learning_rate(config, s, 6), 6) for s in range(6)] == [
        0.0005,
        0.001,
        0.001,
        0.00075,
        0.0005,
        0.00025,
    ]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("learning_rate", 0.0, "learning_rate must be in (0, 1]"),
        ("epochs", 0, "epochs must be in [1, 1000]"),
        ("strategy", "zero3", "strategy must be ddp or fsdp"),
        ("precision", "fp8", "precision must be fp32 or bf16"),
        ("num_workers", 0, "num_workers must be in [1, 1024]"),
    ],  # fmt: skip
)
def test_training_config_validation(field, value, message):
    from wombat_core.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace("[", r"\[")):
        TrainingConfig(**{field: value})
