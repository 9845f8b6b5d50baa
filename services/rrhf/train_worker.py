"""The Ray Train worker: the core's training run (wombat_core.rrhf.trainer) with Ray's device, the job's
event channel and its cancel flag. Sharding, checkpoints and resuming are the core's.

Ray Train initialises torch.distributed (gloo on CPU, NCCL on GPUs) before this runs. On a worker failure
Ray Train restarts the group (FailureConfig) and every worker resumes from the latest checkpoint in the
job's directory, at the same step and data position.
"""

from __future__ import annotations

import ray
import ray.train
import ray.train.torch

from services.rrhf.events import get_channel
from services.rrhf.jobs import TrainingJob
from wombat_core.rrhf.events import to_record
from wombat_core.rrhf.trainer import TrainingHooks, run_training


class _CancelFlag:
    """The job's cancel flag, fetched while the previous step ran, so asking costs no round trip."""

    def __init__(self, channel):
        self._channel = channel
        self._pending = channel.cancelled.remote()

    def __call__(self) -> bool:
        cancelled = ray.get(self._pending)
        self._pending = self._channel.cancelled.remote()
        return cancelled


def train_loop_per_worker(job: TrainingJob) -> None:
    channel = get_channel(job.job_id)
    hooks = TrainingHooks(
        emit=lambda event: channel.put.remote(to_record(event)), cancelled=_CancelFlag(channel)
    )
    run_training(job.run, ray.train.torch.get_device(), hooks)
