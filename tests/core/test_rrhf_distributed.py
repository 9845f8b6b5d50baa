"""Sharded and replicated RRHF training on CPU processes joined by gloo (the code path GPUs run with NCCL):
the weights equal a single-process run's, checkpoints reshard between worker counts, and a resumed run's
losses continue the uninterrupted run's."""

from __future__ import annotations

from dataclasses import replace
from importlib import resources

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import hooks, train_on_workers
from tests.engine_fixtures import save_servable_tiny_model
from wombat_core.rrhf.checkpoints import CheckpointDirectory
from wombat_core.rrhf.data import load_jsonl
from wombat_core.rrhf.events import Resumed, StepFinished
from wombat_core.rrhf.trainer import TrainingRun, run_training
from wombat_core.rrhf.training import TrainingConfig

SHIPPED = resources.files("wombat_core.rrhf") / "data" / "preferences.jsonl"
STEPS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_servable_tiny_model(tmp_path_factory.mktemp("policy") / "policy")


def _run(model_dir, directory, strategy="fsdp", **overrides) -> TrainingRun:
    # Global batch 2 (one query per worker on two workers, two micro-steps on one), every step
    # checkpointed, a learning rate high enough that 4 steps move every weight visibly.
    values = dict(learning_rate=1e-3, batch_size=1, gradient_accumulation_steps=2, max_steps=STEPS,
                  checkpoint_every_steps=1, strategy=strategy, precision="fp32", seed=3)  # fmt: skip
    config = TrainingConfig(**values | overrides)
    records = tuple(load_jsonl(SHIPPED))
    return TrainingRun(
        model_dir, records, config, directory / "checkpoints", directory / "trained", "trained"
    )


def _single_process(run: TrainingRun) -> list[StepFinished]:
    """The reference: one process, no process group, no wrapper."""
    events: list = []
    run_training(run, torch.device("cpu"), hooks(events, None))
    return [e for e in events if isinstance(e, StepFinished)]


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    run = _run(model_dir, tmp_path_factory.mktemp("reference"))
    return run, _single_process(run)


def _weights(directory):
    return load_file(directory / "model.safetensors")


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_workers_train_the_weights_one_process_trains(strategy, model_dir, reference, tmp_path):
    reference_run, reference_steps = reference
    run = _run(model_dir, tmp_path, strategy)
    events = train_on_workers(run, world=2)
    steps = [e for e in events if isinstance(e, StepFinished)]
    assert [s.world_size for s in steps] == [2] * STEPS
    assert [s.loss for s in steps] == pytest.approx([s.loss for s in reference_steps], abs=1e-5)
    trained, expected, initial = (
        _weights(run.output_dir),
        _weights(reference_run.output_dir),
        _weights(model_dir),
    )
    assert trained.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(trained[name], expected[name], atol=2e-5, rtol=1e-4, msg=name)
    moved = [name for name in initial if not torch.equal(trained[name], initial[name])]
    assert len(moved) == len(initial), "every tensor trains (an optimiser built before sharding moves none)"
    # Sharded checkpoints: one DCP file per worker, the newest `keep_checkpoints` kept.
    saved = CheckpointDirectory(run.checkpoint_dir).all()
    assert [c.state.step for c in saved] == [STEPS - 1, STEPS]
    assert sorted(p.name for p in saved[-1].path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_a_run_resumed_on_another_worker_count_continues_the_losses(
    before, after, model_dir, reference, tmp_path
):
    _, reference_steps = reference
    run = _run(model_dir, tmp_path)
    interrupted = train_on_workers(run, world=before, stop_after=2)
    assert [e.step for e in interrupted if isinstance(e, StepFinished)] == [1, 2]
    assert not run.output_dir.exists()
    resumed = train_on_workers(run, world=after)
    (resume,) = [e for e in resumed if isinstance(e, Resumed)]
    assert (resume.step, resume.saved_by_workers, resume.num_workers) == (2, before, after)
    steps = [e for e in resumed if isinstance(e, StepFinished)]
    assert [s.step for s in steps] == [3, 4]
    assert [s.loss for s in steps] == pytest.approx([s.loss for s in reference_steps[2:]], abs=1e-5)
    assert [s.learning_rate for s in steps] == [s.learning_rate for s in reference_steps[2:]]


def test_a_resumed_run_must_keep_its_data_and_global_batch(model_dir, tmp_path):
    from wombat_core.errors import FailedPrecondition

    run = _run(model_dir, tmp_path, max_steps=1)
    _single_process(run)
    changed = replace(
        run, config=replace(run.config, gradient_accumulation_steps=4), output_dir=tmp_path / "again"
    )
    with pytest.raises(FailedPrecondition, match="global batch of 2 queries"):
        _single_process(changed)
