"""The Ray Train worker loop: the core's RRHF step, wrapped with DDP/FSDP, checkpoints and reports.

Checkpoints hold the model and optimiser state and the step (loaded back with weights_only=True). On a
worker failure Ray Train restarts the group (FailureConfig) and every worker resumes from the latest
checkpoint at the same step and data position. Rank 0 writes the final model as an HF safetensors
directory, atomically, with a manifest.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from services.rrhf.events import get_channel
from services.rrhf.jobs import TrainingJob
from wombat_core.atomic import AtomicOutputDir
from wombat_core.manifest import Manifest, ManifestKind, fingerprint_files
from wombat_core.rrhf.training import plan, train_step
from wombat_core.tokenizer import load_tokenizer

STATE_FILE = "rrhf-state.pt"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def train_loop_per_worker(job: TrainingJob) -> None:
    from transformers import AutoModelForCausalLM

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config, records = job.config, job.records
    channel = get_channel(job.job_id)
    torch.manual_seed(config.seed)

    model = AutoModelForCausalLM.from_pretrained(
        str(job.model_dir), dtype=torch.float32, local_files_only=True
    )
    # Padding follows the one RRHF policy (wombat_core.rrhf.collate): the vocabulary is never grown.
    tokenizer = load_tokenizer(job.model_dir, padding_side="right")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        if rank == 0:
            channel.put.remote({"kind": "resumed", "step": start_step})
    # One worker needs no DDP/FSDP wrapper; DDP would copy every gradient through its buckets for nothing.
    model = ray.train.torch.prepare_model(model, parallel_strategy=config.strategy if world > 1 else None)
    steps = plan(config, len(records))
    every = config.checkpoint_every_steps or steps.steps_per_epoch
    channel.put.remote({"kind": "worker", "rank": rank, "pid": os.getpid()})

    cancel_check = channel.cancelled.remote()
    for step in range(start_step, steps.total_steps):
        # The cancel flag is fetched while the previous step ran, so checking it costs no round trip.
        if ray.get(cancel_check):
            channel.put.remote({"kind": "cancelled", "step": step})
            return
        cancel_check = channel.cancelled.remote()
        result = train_step(model, optimizer, tokenizer, records, config, step, steps.total_steps, rank)
        metrics = {
            **result.__dict__,
            "total_steps": steps.total_steps,
            "world_size": world,
            "finished_at": time.time(),
        }
        due = result.step % every == 0 or result.step == steps.total_steps
        # Metrics reach the service through the job channel every step; ray.train.report (a synchronisation
        # point across workers) is only needed when there is a checkpoint to register.
        if due:
            with tempfile.TemporaryDirectory() as directory:
                checkpoint = None
                if rank == 0:
                    state = {
                        "model": _unwrap(model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": result.step,
                    }
                    torch.save(state, Path(directory) / STATE_FILE)
                    checkpoint = ray.train.Checkpoint.from_directory(directory)
                ray.train.report(metrics, checkpoint=checkpoint)
        if rank == 0:
            channel.put.remote({"kind": "step", **metrics})
            if due:
                channel.put.remote({"kind": "checkpoint", "step": result.step})

    if rank == 0:
        _save_final(_unwrap(model), tokenizer, job)
        channel.put.remote({"kind": "saved", "path": job.output_display})


def _save_final(model, tokenizer, job: TrainingJob) -> None:
    from wombat_core.checkpoint.layout import Checkpoint

    base = Checkpoint.open(job.model_dir, role="model")
    inputs = (fingerprint_files("model", job.model_dir.name, [base.file(s) for s in base.shards]),)
    options = {k: str(v) for k, v in job.config.as_dict().items()} | {"job_id": job.job_id}
    with AtomicOutputDir(job.output_dir) as out:
        model.save_pretrained(out.path, safe_serialization=True)
        tokenizer.save_pretrained(out.path)
        out.commit(Manifest(kind=ManifestKind.RRHF_TRAIN, inputs=inputs, options=options, files=()))
