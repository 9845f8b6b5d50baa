"""A Ray actor per job that carries progress events from training workers to the service, and the cancel
flag back. Workers find it by name, so it works the same on a local cluster and on KubeRay."""

from __future__ import annotations

import ray

NAMESPACE = "wombat-rrhf"


@ray.remote(num_cpus=0)
class JobChannel:
    def __init__(self) -> None:
        self._events: list[dict] = []
        self._cancelled = False

    def put(self, event: dict) -> None:
        self._events.append(event)

    def drain(self) -> list[dict]:
        events, self._events = self._events, []
        return events

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled


def channel_name(job_id: str) -> str:
    return f"wombat-job-{job_id}"


def create_channel(job_id: str):
    return JobChannel.options(name=channel_name(job_id), namespace=NAMESPACE, lifetime="detached").remote()


def get_channel(job_id: str):
    return ray.get_actor(channel_name(job_id), namespace=NAMESPACE)
