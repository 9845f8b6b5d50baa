"""One RRHF training run on one worker: load, shard, resume, step, checkpoint, save the trained model.

Every worker of a run calls `run_training` with the same `TrainingRun`; torch.distributed (initialised by
whoever started the workers) connects them. With no process group it is a single-process run, the
reference the distributed layouts are tested against. The caller supplies the device and `TrainingHooks`
(where events go, whether the job was cancelled), so the same loop runs under Ray Train, in a test's
spawned processes, or in a plain script.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import torch

from wombat_core.errors import FailedPrecondition
from wombat_core.rrhf import parallel
from wombat_core.rrhf.checkpoints import CheckpointDirectory, TrainerState
from wombat_core.rrhf.data import PreferenceRecord
from wombat_core.rrhf.events import (
    CheckpointSaved,
    JobEvent,
    OutputSaved,
    Resumed,
    StepFinished,
    TrainingStopped,
    WorkerStarted,
)
from wombat_core.rrhf.training import TrainingConfig, build_optimizer, load_for_training, plan, train_step


@dataclass(frozen=True)
class TrainingRun:
    model_dir: Path
    records: tuple[PreferenceRecord, ...]
    config: TrainingConfig  # precision decided (`for_device`), num_workers = the run's world size
    checkpoint_dir: Path
    output_dir: Path
    output_display: str  # the output as the caller named it, for events
    checkpoint_display: str = ""  # the checkpoint directory as events name it (relative to the model root)
    manifest_options: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainingHooks:
    emit: Callable[[JobEvent], None] = lambda event: None  # called on rank 0, except WorkerStarted
    cancelled: Callable[[], bool] = lambda: False  # asked on every worker before every step


class Outcome(StrEnum):
    FINISHED = "finished"
    CANCELLED = "cancelled"


def run_training(run: TrainingRun, device: torch.device, hooks: TrainingHooks | None = None) -> Outcome:
    hooks = hooks or TrainingHooks()
    rank, world = parallel.rank(), parallel.world_size()
    config = run.config
    if config.num_workers != world:
        raise FailedPrecondition(
            f"the run is configured for {config.num_workers} workers but {world} started"
        )
    torch.manual_seed(config.seed)
    model, tokenizer = load_for_training(run.model_dir, parallel.load_dtype(config, device))
    model = parallel.prepare_model(model, config, device)
    optimizer = build_optimizer(model, config)  # after sharding: it must hold the sharded parameters
    steps = plan(config, len(run.records))
    checkpoints = CheckpointDirectory(run.checkpoint_dir, config.keep_checkpoints)
    start = _resume(checkpoints, model, optimizer, run, hooks, rank)
    hooks.emit(WorkerStarted(rank, os.getpid()))
    every = config.checkpoint_every_steps or steps.steps_per_epoch
    for step in range(start, steps.total_steps):
        if parallel.any_worker(hooks.cancelled(), device):
            if rank == 0:
                hooks.emit(TrainingStopped(step))
            parallel.barrier()  # leave together: a worker tearing down gloo while another is mid-call aborts
            return Outcome.CANCELLED
        result = train_step(model, optimizer, tokenizer, run.records, config, step, steps.total_steps, rank)
        if rank == 0:
            hooks.emit(StepFinished(result.step, steps.total_steps, result.epoch, result.loss, result.rank_loss,
                                    result.sft_loss, result.learning_rate, result.samples_per_second,
                                    result.grad_norm, world, time.time()))  # fmt: skip
        if result.step % every == 0 or result.step == steps.total_steps:
            state = TrainerState(result.step, steps.total_steps, config.global_batch, world, len(run.records))
            path = checkpoints.save(model, optimizer, state)
            if rank == 0:
                hooks.emit(CheckpointSaved(result.step, _display(run, path)))
    save_trained_model(model, tokenizer, run)
    if rank == 0:
        hooks.emit(OutputSaved(run.output_display))
    return Outcome.FINISHED


def _resume(checkpoints: CheckpointDirectory, model, optimizer, run: TrainingRun, hooks: TrainingHooks,
            rank: int) -> int:  # fmt: skip
    """Loads the latest checkpoint, if any, and returns the step to continue from."""
    saved = checkpoints.latest()
    if saved is None:
        return 0
    config = run.config
    if saved.state.global_batch != config.global_batch or saved.state.num_records != len(run.records):
        raise FailedPrecondition(
            f"checkpoint {saved.path.name} was saved with a global batch of {saved.state.global_batch} queries "
            f"over {saved.state.num_records} records; this run has {config.global_batch} over "
            f"{len(run.records)}: resume with the job's own data and batch (workers may change)"
        )
    CheckpointDirectory.load(saved, model, optimizer)
    if rank == 0:
        hooks.emit(Resumed(saved.state.step, saved.state.num_workers, config.num_workers))
    return saved.state.step


def _display(run: TrainingRun, path: Path) -> str:
    return f"{run.checkpoint_display}/{path.name}" if run.checkpoint_display else str(path)


def published_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the base checkpoint's config declares (float32 when it declares none)."""
    from transformers import AutoConfig

    dtype = AutoConfig.from_pretrained(str(model_dir), local_files_only=True).dtype
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def save_trained_model(model: torch.nn.Module, tokenizer, run: TrainingRun) -> None:
    """Gathers the full weights once (a collective; rank 0 receives them in host memory) and writes them as
    a normal HF directory, atomically, with its manifest. The weights are stored in the base checkpoint's
    dtype, the one the model was published and is served in."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = parallel.unwrap(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(inner, options=options) if parallel.distributed() else inner.state_dict()
    if parallel.rank() == 0:
        _write_model(inner, tokenizer, state, run)
    parallel.barrier()  # the output is complete before any worker reports the job done


def _write_model(inner: torch.nn.Module, tokenizer, state: dict, run: TrainingRun) -> None:
    from wombat_core.atomic import AtomicOutputDir
    from wombat_core.checkpoint.layout import Checkpoint
    from wombat_core.manifest import Manifest, ManifestKind, fingerprint_files

    dtype = published_dtype(run.model_dir)
    state = {name: tensor.detach().to("cpu", dtype) for name, tensor in state.items()}
    base = Checkpoint.open(run.model_dir, role="model")
    inputs = (fingerprint_files("model", run.model_dir.name, [base.file(s) for s in base.shards]),)
    with AtomicOutputDir(run.output_dir) as out:
        inner.save_pretrained(out.path, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out.path)
        out.commit(
            Manifest(kind=ManifestKind.RRHF_TRAIN, inputs=inputs, options=run.manifest_options, files=())
        )
