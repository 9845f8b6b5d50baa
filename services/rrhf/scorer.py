"""Score / Rank on a pool of Ray actors, with requests from different callers batched dynamically.

A batch goes to an actor only when one is free; while every actor is busy, callers queue, and the next
free actor takes all of them (up to `max_batch_responses`) in one packed forward. An idle system answers
a lone caller at once; a loaded one batches as much as the load offers, without a fixed wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from wombat_core import errors
from wombat_core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, WombatError
from wombat_core.host_memory import compute_process_env
from wombat_core.rrhf.scoring import ScoreItem

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class ScorerActor:
    """Holds one model. `num_cpus=0`: scoring and training share the machine's cores on a small host;
    on a cluster set `--scorer-gpus` so each replica gets its own accelerator."""

    def __init__(self, model_dir: str, method: str, dtype: str = "auto"):
        import os

        import torch

        from wombat_core.rrhf.loading import load_rrhf_model, scoring_dtype
        from wombat_core.rrhf.scoring import RewardModel

        # The GPU Ray reserved for this actor (num_gpus), else the CPU: never a GPU the actor does not hold.
        device = (
            torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
        )
        if device.type == "cpu":
            # Ray gives a num_cpus=0 actor one thread; on a CPU host the scorer should use the cores it has.
            torch.set_num_threads(os.cpu_count() or 1)
        self.method = method
        # A model that cannot load (no tokenizer, a bad checkpoint) is the caller's to fix: the error is
        # kept and reported by ready(). Raised here, Ray would turn it into ActorDiedError, which keeps
        # only the message, and the caller would see INTERNAL.
        self.load_error: tuple[str, str, str] | None = None
        try:
            torch_dtype = scoring_dtype(dtype, device)
            if method == "reward_model":
                self.reward = RewardModel.load(Path(model_dir), dtype=torch_dtype, device=device)
            else:
                self.model, self.tokenizer = load_rrhf_model(
                    Path(model_dir), dtype=torch_dtype, device=device
                )
                self.model.eval()
        except WombatError as exc:
            self.load_error = (type(exc).__name__, exc.message, exc.reason)

    def score(self, items: list[ScoreItem]) -> list[list[float] | str]:
        """Scores per item; an item that cannot be scored (say, too long) yields its error message instead,
        so one bad request never fails the others batched with it."""
        try:
            return self._score(items)
        except InvalidArgument:
            results: list[list[float] | str] = []
            for item in items:
                try:
                    results.append(self._score([item])[0])
                except InvalidArgument as exc:
                    results.append(exc.message)
            return results

    def _score(self, items: list[ScoreItem]) -> list[list[float]]:
        from wombat_core.prompts import alpaca_prompt_from_query
        from wombat_core.rrhf.scoring import policy_scores

        if self.method == "reward_model":
            results = []
            for item in items:
                query = alpaca_prompt_from_query(item.query) if item.alpaca_prompt else item.query
                results.append(self.reward.score([query + response for response in item.responses]))
            return results
        return policy_scores(self.model, self.tokenizer, items)

    def ready(self) -> tuple[str, str, str] | None:
        """None once the model is loaded; else (error class name, message, reason) of why it did not."""
        return self.load_error


@dataclass
class _Pending:
    item: ScoreItem
    future: asyncio.Future


class ScorerPool:
    def __init__(self, model_dir: Path, method: str, replicas: int, max_batch_responses: int = 256,
                 gpus_per_replica: float = 0.0, max_pending: int = 64, dtype: str = "auto"):  # fmt: skip
        self.model_dir, self.method = model_dir, method
        # A CPU replica's batches reuse the last one's buffers instead of page-faulting them in (host_memory).
        options = (
            {"num_gpus": gpus_per_replica}
            if gpus_per_replica
            else {"runtime_env": {"env_vars": compute_process_env()}}
        )
        self.actors = [
            ScorerActor.options(**options).remote(str(model_dir), method, dtype) for _ in range(replicas)
        ]
        self._free: asyncio.Queue[int] | None = None  # indices of actors with no batch in flight
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        self.max_batch_responses = max_batch_responses
        self.last_used = time.monotonic()
        # Admission control: requests queued or being scored. Beyond it a caller is refused at once
        # (RESOURCE_EXHAUSTED) instead of waiting in an unbounded queue.
        self.max_pending, self._pending = max_pending, 0

    @property
    def in_progress(self) -> int:
        return self._pending

    async def wait_ready(self) -> None:
        """Raises the suite's own error (FAILED_PRECONDITION for a model without a tokenizer, ...) when a
        replica could not load the model."""
        for failure in await asyncio.gather(*(actor.ready.remote() for actor in self.actors)):
            if failure is not None:
                name, message, reason = failure
                cls = getattr(errors, name, None)
                if not (isinstance(cls, type) and issubclass(cls, WombatError)):
                    cls = FailedPrecondition
                raise cls(message, reason=reason)

    async def score(self, item: ScoreItem) -> list[float]:
        if self._pending >= self.max_pending:
            raise ResourceExhausted(
                f"the scorer for this model has {self._pending} requests in progress (the limit); "
                "retry with backoff, or run the service with more --scorer-replicas"
            )
        self.last_used = time.monotonic()
        if self._queue is None:
            self._queue, self._free = asyncio.Queue(), asyncio.Queue()
            for index in range(len(self.actors)):
                self._free.put_nowait(index)
            self._task = asyncio.create_task(self._batcher())
        future = asyncio.get_running_loop().create_future()
        self._pending += 1
        try:
            await self._queue.put(_Pending(item, future))
            return await future
        finally:
            self._pending -= 1

    async def _batcher(self) -> None:
        assert self._queue is not None and self._free is not None
        while True:
            first = await self._queue.get()
            index = await self._free.get()  # callers keep queueing while every actor is busy
            batch, size = [first], len(first.item.responses)
            while not self._queue.empty() and size < self.max_batch_responses:
                pending = self._queue.get_nowait()
                batch.append(pending)
                size += len(pending.item.responses)
            asyncio.create_task(self._dispatch(index, batch))

    async def _dispatch(self, index: int, batch: list[_Pending]) -> None:
        try:
            results = await self.actors[index].score.remote([p.item for p in batch])
        except Exception as exc:  # noqa: BLE001 - delivered to each waiting caller
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        finally:
            assert self._free is not None
            self._free.put_nowait(index)
        for pending, scores in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(scores, str):
                pending.future.set_exception(InvalidArgument(scores))
            else:
                pending.future.set_result(scores)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for actor in self.actors:
            ray.kill(actor)
