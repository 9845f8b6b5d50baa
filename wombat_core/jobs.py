"""Progress reporting and cooperative cancellation for long-running core jobs.

Core jobs run in a worker thread. They call `control.check_cancelled()` between tensors and
`control.advance(...)` after each one; the transport layer sets the cancel event when the client goes away.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from wombat_core.errors import Cancelled


@dataclass(frozen=True)
class Progress:
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    current_shard: str
    elapsed_seconds: float
    eta_seconds: float | None


class JobControl:
    """Counts work done, reports progress at most every `interval` seconds, and carries the cancel flag."""

    def __init__(
        self,
        on_progress: Callable[[Progress], None] | None = None,
        cancel_event: threading.Event | None = None,
        interval: float = 0.2,
    ):
        self._on_progress = on_progress
        self.cancel_event = cancel_event or threading.Event()
        self._interval = interval
        self._started = time.monotonic()
        self._last_report = float("-inf")
        self.tensors_done = self.tensors_total = self.bytes_done = self.bytes_total = 0
        self.current_shard = ""

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled("the job was cancelled; no output was written")

    def start(self, tensors_total: int, bytes_total: int) -> None:
        self.tensors_total, self.bytes_total = tensors_total, bytes_total
        self._report(force=True)

    def advance(self, shard: str, tensors: int, nbytes: int) -> None:
        self.current_shard = shard
        self.tensors_done += tensors
        self.bytes_done += nbytes
        self._report(force=self.tensors_done == self.tensors_total)

    def _report(self, force: bool) -> None:
        now = time.monotonic()
        if self._on_progress is None or (not force and now - self._last_report < self._interval):
            return
        self._last_report = now
        elapsed = now - self._started
        eta = None
        if self.bytes_done and self.bytes_total:
            eta = elapsed * (self.bytes_total - self.bytes_done) / self.bytes_done
        self._on_progress(
            Progress(
                tensors_done=self.tensors_done,
                tensors_total=self.tensors_total,
                bytes_done=self.bytes_done,
                bytes_total=self.bytes_total,
                current_shard=self.current_shard,
                elapsed_seconds=elapsed,
                eta_seconds=eta,
            )
        )
