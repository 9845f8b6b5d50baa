"""Training checkpoints that scale: sharded, resumable on any number of workers, never half-written.

A checkpoint is a `torch.distributed.checkpoint` (DCP) directory in the job's directory on the model
store: every worker writes its own shard of the model and optimiser state in parallel, and no worker
ever holds the whole state (a 7B model with AdamW is ~81 GB). State dicts are taken with
`get_state_dict`, keyed by parameter name, so a checkpoint saved by 2 FSDP workers loads into 1 worker,
into 4, or into a plain model: DCP reshards on load.

Layout, under the job's checkpoint directory:

    step-00000040/            one complete checkpoint
        .metadata, __0_0.distcp, __1_0.distcp, ...    DCP's files
        trainer_state.json    the step and the run's layout, written last: its presence marks completion
    .step-00000050.partial/   a save in progress (or interrupted: ignored, removed by the next save)

A save writes into the `.partial` directory and renames it once every worker has written, so a worker
killed mid-save leaves the previous checkpoint as the latest. The newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wombat_core.atomic import write_file_atomically
from wombat_core.rrhf import parallel

STATE_FILE = "trainer_state.json"
_COMPLETE = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class TrainerState:
    """What a resumed run needs besides the tensors."""

    step: int  # optimiser steps done
    total_steps: int
    global_batch: int  # queries per step; a resumed run must keep it to see the same data per step
    num_workers: int  # the layout that saved it (informational: DCP reshards)
    num_records: int


@dataclass(frozen=True)
class SavedCheckpoint:
    path: Path
    state: TrainerState


class CheckpointDirectory:
    def __init__(self, directory: Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    def all(self) -> list[SavedCheckpoint]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            if _COMPLETE.match(path.name) and (path / STATE_FILE).is_file():
                state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
                found.append(SavedCheckpoint(path, state))
        return sorted(found, key=lambda c: c.state.step)

    def latest(self) -> SavedCheckpoint | None:
        saved = self.all()
        return saved[-1] if saved else None

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState) -> Path:
        """Every worker calls it (a collective). Returns the checkpoint's path."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = self.directory / f"step-{state.step:08d}"
        partial = self.directory / f".{final.name}.partial"
        if parallel.rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # left by a save that was interrupted
            partial.mkdir()
        parallel.barrier()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save(
            {"model": model_state, "optimizer": optimizer_state},
            checkpoint_id=str(partial),
            no_dist=not parallel.distributed(),
        )
        parallel.barrier()  # every worker's shard is on disk
        if parallel.rank() == 0:
            write_file_atomically(partial / STATE_FILE, json.dumps(asdict(state)))
            shutil.rmtree(final, ignore_errors=True)  # a step redone after a crash between rename and report
            partial.rename(final)
            for old in self.all()[: -self.keep]:
                shutil.rmtree(old.path, ignore_errors=True)
        parallel.barrier()
        return final

    @staticmethod
    def load(saved: SavedCheckpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Every worker calls it after `prepare_model` and `build_optimizer`: DCP reads each worker's part
        of every tensor, whatever layout wrote the checkpoint."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(saved.path), no_dist=not parallel.distributed())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
