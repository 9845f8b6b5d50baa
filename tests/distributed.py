"""Runs the core's training on N processes connected by torch.distributed (gloo), the way Ray Train,
torchrun or a GPU pod group would: each process initialises the group and calls `run_training`."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wombat_core.rrhf.events import CheckpointSaved, JobEvent, from_record, to_record
from wombat_core.rrhf.trainer import TrainingHooks, TrainingRun, run_training


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world: int, port: int, run: TrainingRun, stop_after: int | None, events_file: str
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two workers on two cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    events: list[JobEvent] = []
    try:
        run_training(run, torch.device("cpu"), hooks(events, stop_after))
        dist.barrier()  # no worker tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
    Path(f"{events_file}.rss{rank}").write_text(str(peak_rss()))
    if rank == 0:
        Path(events_file).write_text(json.dumps([to_record(e) for e in events]))


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, the high-water mark of its own address space.
    Not getrusage's ru_maxrss, which a spawned child inherits from the parent it was forked from (Linux
    carries the old address space's peak across execve), so a big parent would inflate every worker's figure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def hooks(events: list[JobEvent], stop_after: int | None) -> TrainingHooks:
    """Collects events; with `stop_after`, the run is cancelled once that step's checkpoint is saved
    (an interruption with a checkpoint to resume from)."""

    def cancelled() -> bool:
        return stop_after is not None and any(
            isinstance(e, CheckpointSaved) and e.step >= stop_after for e in events
        )

    return TrainingHooks(emit=events.append, cancelled=cancelled)


def train_on_workers(run: TrainingRun, world: int, stop_after: int | None = None) -> list[JobEvent]:
    """Runs `run` on `world` gloo processes (the config's worker count set to match); rank 0's events."""
    return train_and_measure(run, world, stop_after)[0]


def train_and_measure(
    run: TrainingRun, world: int, stop_after: int | None = None
) -> tuple[list[JobEvent], list[int]]:
    """`train_on_workers`, and each worker's peak resident memory in bytes."""
    run = replace(run, config=run.config.with_workers(world))
    events_file = run.checkpoint_dir.parent / f"events-{os.getpid()}-{_free_port()}.json"
    run.checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(world, _free_port(), run, stop_after, str(events_file)), nprocs=world,
                       start_method="spawn")  # fmt: skip
    peaks = [int(Path(f"{events_file}.rss{rank}").read_text()) for rank in range(world)]
    return [from_record(r) for r in json.loads(events_file.read_text())], peaks
