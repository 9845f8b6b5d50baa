"""The scheduler: the bounded waiting queue, admission into prefill groups, and which requests hold a row
(after vLLM v1's Scheduler; it knows nothing about tensors or text).

Requests move waiting → prefilling (a group of newcomers, prefilled together in the cache's top slots) →
running (row i of the runner and the sampler is `running[i]`) → gone. The queue is bounded: beyond
`max_queue` requests waiting for a free slot, `add` refuses at once (RESOURCE_EXHAUSTED) instead of
letting latency grow without bound. Callers on any thread add and cancel; the engine thread does the
rest. One condition variable guards what both sides touch (the queue, cancellations, the state flags).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

from wombat_core.engine.kv_cache import compaction_moves
from wombat_core.engine.output import RequestState
from wombat_core.errors import ResourceExhausted, Unavailable


@dataclass
class PrefillingGroup:
    """The newcomers of the prefill in flight and their rows within the runner's group (cancelled ones are
    left out of both; their rows are prefilled anyway and left behind)."""

    requests: list[RequestState] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)


@dataclass
class SchedulerStats:
    waiting: int
    prefilling: int
    running: int


class Scheduler:
    def __init__(self, max_batch_size: int, max_queue: int, max_prefill_tokens: int):
        self.max_batch_size, self.max_queue, self.max_prefill_tokens = (
            max_batch_size,
            max_queue,
            max_prefill_tokens,
        )
        self.lock = threading.Condition()
        self.waiting: collections.deque[RequestState] = collections.deque()
        self.cancelled: set[str] = set()
        self.prefilling = PrefillingGroup()
        self.running: list[RequestState] = []  # in row order
        self.stopping = False
        self.failure: BaseException | None = None  # set once the engine died; nothing is admitted after

    # --- any thread ---------------------------------------------------------------------------------

    def add(self, state: RequestState) -> None:
        with self.lock:
            if self.failure is not None:
                raise Unavailable(f"the engine has failed ({_describe(self.failure)}); retry another replica")
            if self.stopping:
                raise Unavailable("the engine is shutting down")
            free_slots = self.max_batch_size - len(self.running) - len(self.prefilling.requests)
            if len(self.waiting) >= self.max_queue + max(0, free_slots):
                raise ResourceExhausted(
                    f"the server is at capacity ({len(self.waiting)} requests waiting, "
                    f"{len(self.running)} running); retry with backoff",
                    metadata={"retry_after_seconds": "1"},
                )
            self.waiting.append(state)
            self.lock.notify_all()

    def cancel(self, request_id: str) -> None:
        with self.lock:
            self.cancelled.add(request_id)
            self.lock.notify_all()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.waiting), len(self.prefilling.requests), len(self.running))

    # --- the engine thread ----------------------------------------------------------------------------

    def next_work(self) -> set[str] | None:
        """Blocks until there is something to do; returns the cancellations to apply, or None to stop."""
        with self.lock:
            while not (self.waiting or self.prefilling.requests or self.running or self.cancelled
                       or self.stopping):  # fmt: skip
                self.lock.wait()
            if self.stopping:
                return None
            cancelled, self.cancelled = self.cancelled, set()
            return cancelled

    def await_arrivals(self, count: int, timeout: float) -> None:
        """Waits up to `timeout` seconds until `count` requests are waiting (returns at once if they are),
        or a cancellation or stop comes."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.waiting) < count and not (self.cancelled or self.stopping):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.lock.wait(left)

    def take_cancelled(self, ids: set[str]) -> tuple[list[RequestState], list[int]]:
        """Takes the cancelled requests out of the queue and the prefilling group; returns them with the
        running rows that are cancelled (the caller retires those rows)."""
        with self.lock:
            taken = [s for s in self.waiting if s.id in ids]
            self.waiting = collections.deque(s for s in self.waiting if s.id not in ids)
        group = self.prefilling
        if any(s.id in ids for s in group.requests):
            taken += [s for s in group.requests if s.id in ids]
            kept = [(s, row) for s, row in zip(group.requests, group.rows, strict=True) if s.id not in ids]
            self.prefilling = PrefillingGroup([s for s, _ in kept], [row for _, row in kept])
        rows = [row for row, s in enumerate(self.running) if s.id in ids]
        return taken, rows

    def admit(self) -> list[RequestState]:
        """Forms the next prefill group from the head of the queue (FIFO): as many as there are free slots,
        while the group's padded tokens stay within max_prefill_tokens (the first always fits)."""
        free = self.max_batch_size - len(self.running)
        chosen: list[RequestState] = []
        with self.lock:
            longest = 0
            while self.waiting and len(chosen) < free:
                candidate = self.waiting[0].prompt_length
                padded = max(longest, candidate) * (len(chosen) + 1)
                if chosen and padded > self.max_prefill_tokens:
                    break
                longest = max(longest, candidate)
                chosen.append(self.waiting.popleft())
        now = time.monotonic()
        for state in chosen:
            state.scheduled = now
        self.prefilling = PrefillingGroup(chosen, list(range(len(chosen))))
        return chosen

    def prefilled(self) -> PrefillingGroup:
        """The prefilling group is complete: its live requests become the last running rows."""
        group, self.prefilling = self.prefilling, PrefillingGroup()
        self.running.extend(group.requests)
        return group

    def abandon_prefill(self) -> list[RequestState]:
        """The prefilling group cannot run (its cache rows could not be allocated): its requests leave."""
        group, self.prefilling = self.prefilling, PrefillingGroup()
        return group.requests

    def retire(self, rows: list[int]) -> list[tuple[int, int]]:
        """Rows leave; returns the compaction moves (destination, source) that every owner of per-row state
        applies (this list, the runner, the sampler)."""
        remaining = len(self.running) - len(rows)
        moves = compaction_moves(len(self.running), rows)
        for destination, source in moves:
            self.running[destination] = self.running[source]
        del self.running[remaining:]
        return moves

    def drain(self, failure: BaseException | None) -> list[RequestState]:
        """Empties every state (the engine stopped or died); returns the requests that were in it. With a
        `failure`, later `add`s are refused naming it."""
        with self.lock:
            if failure is not None:
                self.failure = failure
            victims = [*self.running, *self.prefilling.requests, *self.waiting]
            self.waiting.clear()
        self.running, self.prefilling = [], PrefillingGroup()
        return victims


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]
