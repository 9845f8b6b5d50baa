"""The engine loop: one thread that schedules, runs the model and emits stream events.

Split after vLLM v1's engine core: the `Scheduler` owns the queue, admission and which request holds
which row; the `ModelRunner` executes prefill chunks and batched decode steps and owns the KV cache; the
`BatchSampler` turns logits into tokens; the `OutputProcessor` turns tokens into stream events (text,
stops, logprob texts, final events). This loop wires them. Each iteration:
  1. applies cancellations (a cancelled request leaves the batch before the next decode step);
  2. if no prefill group is in flight and slots are free, admits one from the head of the queue (after a
     step that let rows go, it first waits a few milliseconds for their callers' next requests:
     EngineConfig.admission_wait_s);
  3. runs the model: the next prefill chunk of that group and a decode step for the running rows, in one
     forward where the runner can (runner.step), or on CPU, for a short prompt, the chunk first as its
     own forward (EngineConfig.prefill_first), so that the newcomers' first tokens go out before the
     decode step;
  4. samples every running row's next token in one batched call, emits them, and lets finished rows go;
  5. when the group's prompts are complete, moves it next to the running rows and emits each newcomer's
     first token.
So a newcomer waits for at most the step in flight, its prefill delays running streams by at most one
chunk, and finished rows leave at once.

A failure that escapes a step (a CUDA error, an out-of-memory, a bug) leaves the cache and the rows in
an unknown state, so it kills the engine, as vLLM's EngineDeadError does: every request in flight or
waiting gets the error, new requests are refused, and `on_death` callbacks run so that the server can
report NOT_SERVING and exit for its supervisor to restart it. A request's own numeric failure (NaN
logits) or a full KV cache at admission fails that request only.

Callers use `generate()` (a blocking iterator, any thread) or `generate_async()` (asyncio); both are thin
bridges over `submit(request, sink)`, whose `sink(event)` is called on the engine thread and must not block.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import torch

from wombat_core.engine.cpu_kernels import use_threads
from wombat_core.engine.grammar import Grammars
from wombat_core.engine.kv_cache import KVCacheFull
from wombat_core.engine.output import OutputProcessor, RequestState, Sink
from wombat_core.engine.runner import ModelRunner, PrefillGroup, PromptScores
from wombat_core.engine.sampler import BatchSampler, SamplingRow
from wombat_core.engine.scheduler import Scheduler
from wombat_core.engine.types import (
    GRAMMAR_REFUSED,
    FinishReason,
    GenerationRequest,
    StreamEvent,
    TokenLogprob,
)
from wombat_core.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

# The admission wait never exceeds this share of the last step. Measured (16 streams on the AVX2 EPYC, 70 ms
# steps): a caller's next request reached the engine 3-10 ms after its final event.
ADMISSION_WAIT_STEP_SHARE = 0.15
# On CPU a group's prefill runs apart from the decode step when it is at most this many tokens
# (EngineConfig.prefill_first). Measured on the AVX2 EPYC, 16 streams: ~40-token prompts apart, TTFT p50
# 205 -> 119-136 ms at the same tok/s; ~175-token prompts apart, TTFT unchanged (the prefill itself is most
# of it) and 5 % fewer tok/s (the decode step reads the weights a second time), so long ones share it.
PREFILL_FIRST_MAX_TOKENS = 128


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 8
    max_queue: int = 64  # waiting requests beyond the running batch; more are refused at once
    max_prefill_tokens: int = 512  # tokens per prefill chunk (over all rows of the group)
    context_length: int = 2048
    max_new_tokens_limit: int = 4096
    # CPUs of the engine thread (cpu_kernels.use_threads: numba's or OpenBLAS's threads, or torch's team); None
    # leaves the settings alone. The engine thread should be the process's only multi-threaded user: a
    # second team on the same cores slows every op by half (libgomp stops spinning when its threads
    # outnumber the cores), so whoever loads the model for a server loads it single-threaded and gives the
    # engine the cores (services/inference/server.py).
    cpu_threads: int | None = None
    # CUDA only: the fraction of the device's memory the weights, the KV cache (allocated whole at start)
    # and activations may use, as vLLM's --gpu-memory-utilization.
    gpu_memory_utilization: float = 0.9
    # After a step that let rows go while nobody waits, how long the next step may wait for newcomers
    # (never more than ADMISSION_WAIT_STEP_SHARE of the last step). A caller that sends its next request
    # on its final event (a benchmark, an eval harness, a worker draining a queue) arrives a few
    # milliseconds after the next step started and would wait that whole step before its prefill began;
    # waiting a few milliseconds instead starts its prefill one step sooner. It costs at most that share
    # of a step, only after steps that freed a slot with the queue empty; 0 turns it off.
    admission_wait_s: float = 0.010
    # Whether a newcomer's prefill chunk runs as its own forward before the running rows' decode step (its
    # first token goes out after that forward), rather than in one forward with it. None: on CPU for short
    # prompts (PREFILL_FIRST_MAX_TOKENS), where a multiplication of 16 + 40 rows costs nearly what 16 and 40
    # apart cost (the GEMM is compute-bound at these sizes), so running them apart costs the batch little
    # and spares a newcomer a decode step's wait; not on CUDA, where decode is bound by reading the weights
    # and prefill tokens ride along almost free (vLLM v1).
    prefill_first: bool | None = None

    def __post_init__(self) -> None:
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise InvalidArgument(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        for name in ("max_batch_size", "max_prefill_tokens", "context_length", "max_new_tokens_limit"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise InvalidArgument(f"max_queue must be >= 0, got {self.max_queue}")
        if self.admission_wait_s < 0:
            raise InvalidArgument(f"admission_wait_s must be >= 0, got {self.admission_wait_s}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidArgument(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass
class EngineStats:
    waiting: int
    prefilling: int
    running: int
    decode_steps: int = 0  # since start: a clock for "freed within one step"
    kv_cache_usage: float = 0.0  # fraction of the allocated KV-cache columns that running rows hold

    @property
    def in_batch(self) -> int:
        """Requests holding a batch slot, being prefilled or decoded (what vLLM calls running)."""
        return self.running + self.prefilling


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, config: EngineConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.eos_token_ids = _eos_ids(model, tokenizer)
        # Ids index the model's embedding and the sampler's [rows, vocab] tensors: an id the tokenizer knows
        # but the model does not would be a device-side assert on CUDA, so both bounds apply.
        self.vocab_size = min(len(tokenizer), int(model.config.vocab_size))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        self.runner = ModelRunner(model, pad, config.max_batch_size, config.context_length,
                                  memory_utilization=config.gpu_memory_utilization,
                                  max_prefill_tokens=config.max_prefill_tokens)  # fmt: skip
        self.sampler = BatchSampler(config.max_batch_size, model.config.vocab_size, self.runner.device)
        self.scheduler = Scheduler(config.max_batch_size, config.max_queue, config.max_prefill_tokens)
        self.output = OutputProcessor(tokenizer, self.eos_token_ids, config.context_length)
        self.grammars = Grammars(tokenizer, int(model.config.vocab_size), self.eos_token_ids)
        self._decode_steps = 0
        self._group = None  # the runner's PrefillGroup in flight
        self._freed = 0  # rows that finished in the last step (their callers may send again at once)
        # The most prompt tokens (over a group) whose prefill runs apart from the decode step.
        if config.prefill_first is None:
            self._prefill_first_tokens = PREFILL_FIRST_MAX_TOKENS if self.runner.device.type == "cpu" else 0
        else:
            self._prefill_first_tokens = math.inf if config.prefill_first else 0
        self._last_step_s = 0.0
        self._thread: threading.Thread | None = None
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = (
            weakref.WeakKeyDictionary()
        )
        # Called on the engine thread with every request's final event (cancellations included): metrics.
        self.on_finish: Callable[[StreamEvent], None] | None = None
        # Called once, on the engine thread, with the failure that killed the engine.
        self.on_death: list[Callable[[BaseException], None]] = []

    # --- public API (any thread) -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="wombat-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.scheduler.stop()
        if self._thread is not None:
            self._thread.join(30)

    @property
    def failure(self) -> BaseException | None:
        """What killed the engine, or None while it is alive."""
        return self.scheduler.failure

    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        """Queues a request. Raises ResourceExhausted at once when the waiting queue is full."""
        request.check_against_model(vocab_size=self.vocab_size, context_length=self.config.context_length,
                                    max_new_tokens_limit=self.config.max_new_tokens_limit)  # fmt: skip
        state = self.output.new_request(request, sink)
        if request.params.structured is not None:  # compiled now: an invalid schema never takes a slot
            state.matcher = self.grammars.matcher(request.params.structured)
        self.scheduler.add(state)

    def generate(self, request: GenerationRequest) -> Iterator[list[StreamEvent]]:
        """Submits `request` now (a full queue raises ResourceExhausted here) and returns its events as they
        arrive, in lists: each holds every event since the previous list, so a consumer that lags reads them
        coalesced. The last list ends with the finished event; an engine failure is raised instead. Closing
        the iterator before the end (`close()`, `break` then garbage collection) cancels the request."""
        inbox: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        self.submit(request, inbox.put)

        def events() -> Iterator[list[StreamEvent]]:
            finished = False
            try:
                while not finished:
                    batch = [inbox.get()]
                    while not inbox.empty():
                        batch.append(inbox.get_nowait())
                    finished = _ends(batch)
                    yield batch
            finally:
                if not finished:
                    self.cancel(request.request_id)

        return events()

    def generate_async(self, request: GenerationRequest) -> AsyncIterator[list[StreamEvent]]:
        """`generate()` for asyncio code; call it on the event loop. Use `contextlib.aclosing` (or read to
        the end): a consumer that is cancelled or stops early cancels the request at once."""
        loop = asyncio.get_running_loop()
        with self.scheduler.lock:
            mailbox = self._mailboxes.get(loop) or self._mailboxes.setdefault(loop, _Mailbox(loop))
        inbox: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.submit(request, lambda event: mailbox.post(inbox, event))

        async def events() -> AsyncIterator[list[StreamEvent]]:
            finished = False
            try:
                while not finished:
                    batch = [await inbox.get()]
                    while not inbox.empty():
                        batch.append(inbox.get_nowait())
                    finished = _ends(batch)
                    yield batch
            finally:
                if not finished:  # the consumer went away (a disconnect, a deadline): free the slot now
                    self.cancel(request.request_id)

        return events()

    def cancel(self, request_id: str) -> None:
        """Removes the request before the next decode step; its sink gets a CANCELLED final event."""
        self.scheduler.cancel(request_id)

    def stats(self) -> EngineStats:
        counts = self.scheduler.stats()
        return EngineStats(counts.waiting, counts.prefilling, counts.running, self._decode_steps,
                           self.runner.cache_usage())  # fmt: skip

    # --- the loop (engine thread) ------------------------------------------------------------------

    def _loop(self) -> None:
        failure: BaseException | None = None
        try:
            if self.config.cpu_threads is not None:
                use_threads(self.model, self.config.cpu_threads)
            with torch.inference_mode():
                while (cancelled := self.scheduler.next_work()) is not None:
                    self._iterate(cancelled)
        except BaseException as exc:  # noqa: BLE001 - whatever escapes a step kills the engine (docstring)
            log.exception("engine step failed: the engine is dead; failing every request")
            failure = exc
        self._shut_down(failure)

    def _iterate(self, cancelled: set[str]) -> None:
        if cancelled:
            self._apply_cancellations(cancelled)
        if self._group is None:
            self._await_newcomers()
            self._admit()
        group, decoding = self._group, bool(self.scheduler.running)
        if group is None and not decoding:
            return
        started = time.monotonic()
        if (
            group is not None
            and decoding
            and group.rows * (group.length - group.done) <= self._prefill_first_tokens
        ):
            logits = self.runner.step(group, self.config.max_prefill_tokens, decode=False)
            if logits.prefill is not None:  # its first tokens go out now; the newcomers decode below
                self._complete_prefill(group, logits.prefill, logits.prompt)
            group, decoding = None, bool(self.scheduler.running)
        logits = self.runner.step(group, self.config.max_prefill_tokens)
        if decoding:
            self._decode_steps += 1
            self._sample_and_emit(logits.decode, slice(0, len(self.scheduler.running)))
        if logits.prefill is not None:
            assert group is not None
            self._complete_prefill(group, logits.prefill, logits.prompt)
        self._last_step_s = time.monotonic() - started

    def _await_newcomers(self) -> None:
        """After a step that let rows go, gives their callers' next requests a moment to arrive, so that
        they join this step's prefill rather than the one after it (EngineConfig.admission_wait_s)."""
        freed, self._freed = self._freed, 0
        if freed and self.scheduler.running and self.config.admission_wait_s > 0:
            window = min(self.config.admission_wait_s, ADMISSION_WAIT_STEP_SHARE * self._last_step_s)
            self.scheduler.await_arrivals(freed, window)

    def _apply_cancellations(self, ids: set[str]) -> None:
        """Takes the cancelled requests out of the queue, the prefill group and the running rows, then
        sends each its CANCELLED final event (slots first, as in `_emit_and_retire`)."""
        taken, rows = self.scheduler.take_cancelled(ids)
        if not self.scheduler.prefilling.requests:
            self._group = None  # every newcomer of the group was cancelled: drop its prefill
        taken += [self.scheduler.running[row] for row in rows]
        if rows:
            self._retire(rows)
        for state in taken:
            self._deliver(state, self.output.final(state, FinishReason.CANCELLED))

    def _admit(self) -> None:
        chosen = self.scheduler.admit()
        if not chosen:
            return
        prompts = [s.request.prompt_token_ids for s in chosen]
        try:
            self._group = self.runner.new_group(prompts, max(s.request.params.max_new_tokens for s in chosen),
                                                [s.request.params.prompt_logprobs for s in chosen])  # fmt: skip
        except KVCacheFull as exc:  # the cache is as it was: only these newcomers fail
            log.warning("%s", exc.message)
            for state in self.scheduler.abandon_prefill():
                self._deliver(state, self.output.failed(state, exc))

    def _complete_prefill(
        self, group: PrefillGroup, logits: torch.Tensor, prompt: PromptScores | None
    ) -> None:
        """The group's prompts are complete: its live newcomers join the running rows (after the rows that
        finished in this step left) and get their first tokens (and their prompt logprobs, when asked)."""
        self._group = None
        newcomers = self.scheduler.prefilled()
        if prompt is not None:
            self._hand_prompt_logprobs(group, prompt, newcomers.rows, newcomers.requests)
        first = self.runner.complete_group(group, newcomers.rows)
        self.sampler.add_rows(first, [self._sampling_row(s) for s in newcomers.requests])
        if len(newcomers.rows) < group.rows:
            logits = logits[torch.tensor(newcomers.rows, device=logits.device)]
        self._sample_and_emit(logits, slice(first, first + len(newcomers.requests)))

    def _hand_prompt_logprobs(self, group: PrefillGroup, prompt: PromptScores, rows: list[int],
                              requests: list[RequestState]) -> None:  # fmt: skip
        """One host transfer for the group's prompt logprobs; each asking newcomer gets its own columns (from
        its first real token, past its left padding)."""
        packed = prompt.packed.tolist()
        for row, state in zip(rows, requests, strict=True):
            wanted = state.request.params.prompt_logprobs
            if wanted is None:
                continue
            columns = packed[prompt.rows.index(row)][group.offsets[row] :]
            entries = [
                (int(c[0]), c[1], [(int(c[2 + prompt.top + i]), c[2 + i]) for i in range(wanted)])
                for c in columns
            ]
            self.output.set_prompt_logprobs(state, entries)

    def _sampling_row(self, state: RequestState) -> SamplingRow:
        params = state.request.params
        eos = () if params.ignore_eos else self.eos_token_ids
        return SamplingRow(params, state.seed, state.request.prompt_token_ids, eos, state.matcher)

    def _sample_and_emit(self, logits: torch.Tensor, rows: slice) -> None:
        """One batched sampler call for `rows`, one host transfer, then the rows' events."""
        output = self.sampler.sample(logits, rows)
        self.runner.set_last_tokens(rows.start, output.tokens)
        tokens, logprobs = output.to_host()
        for row in self.sampler.accept(rows.start, tokens):
            tokens[row - rows.start] = GRAMMAR_REFUSED
        self._emit_and_retire(rows.start, tokens, logprobs)

    def _emit_and_retire(self, first: int, tokens: list[int], logprobs: list[TokenLogprob | None]) -> None:
        """Emits each row's new token. Finished rows leave *before* their final events go out, so a caller
        that submits again on seeing its final event finds the slot free."""
        finished_rows, events = [], []
        now = time.monotonic()
        for row, token, logprob in zip(range(first, first + len(tokens)), tokens, logprobs, strict=True):
            state = self.scheduler.running[row]
            event = self.output.process(state, token, logprob, now)
            events.append((state, event))
            if event.finished:
                finished_rows.append(row)
        if finished_rows:
            self._freed += len(finished_rows)
            self._retire(finished_rows)
        for state, event in events:
            self._deliver(state, event)

    def _retire(self, rows: list[int]) -> None:
        """Rows leave: the scheduler, the runner and the sampler apply the same compaction moves."""
        moves = self.scheduler.retire(rows)
        self.runner.move_rows(moves, len(self.scheduler.running))
        self.sampler.move_rows(moves)

    def _deliver(self, state: RequestState, event: StreamEvent) -> None:
        """Hands an event to its request's sink. A sink that raises (its event loop is gone) loses its
        request, which is cancelled; it never takes the engine down. So does a failing metrics hook."""
        try:
            state.sink(event)
        except Exception:  # noqa: BLE001
            log.exception("request %s: its consumer failed; cancelling it", state.id)
            if not event.finished:
                self.cancel(state.id)
        if event.finish_reason is not None and self.on_finish is not None:
            try:
                self.on_finish(event)
            except Exception:  # noqa: BLE001
                log.exception("request %s: the on_finish hook failed", state.id)

    def _shut_down(self, failure: BaseException | None) -> None:
        """Fails every request left (in flight and waiting) and, after a failure, reports the death."""
        error = (
            Unavailable(
                f"the inference engine failed ({type(failure).__name__}: {failure}); retry on another "
                "replica while this one restarts"
            )  # fmt: skip
            if failure is not None
            else Unavailable("the engine stopped")
        )
        error.__cause__ = failure
        self._group = None
        for state in self.scheduler.drain(failure):
            self._deliver(state, self.output.failed(state, error))
        if failure is not None:
            for callback in self.on_death:
                try:
                    callback(failure)
                except Exception:  # noqa: BLE001
                    log.exception("an on_death callback failed")


class _Mailbox:
    """Hands events from the engine thread to one event loop: every event of a step travels in one wake-up
    of the loop (one `call_soon_threadsafe`), not one per request, which matters with many streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, StreamEvent]] = []
        self._scheduled = False

    def post(self, inbox: asyncio.Queue, event: StreamEvent) -> None:
        with self._lock:
            self._pending.append((inbox, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for inbox, event in pending:
            inbox.put_nowait(event)


def _ends(batch: list[StreamEvent]) -> bool:
    """Whether `batch` ends its request; raises the engine's error if it carries one."""
    for event in batch:
        if event.error is not None:
            raise event.error  # the engine has already dropped the request
    return batch[-1].finished


def _eos_ids(model: torch.nn.Module, tokenizer) -> tuple[int, ...]:
    generation_config = getattr(model, "generation_config", None)
    return merge_token_ids(getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id)


def merge_token_ids(*candidates) -> tuple[int, ...]:
    """Every id named by `candidates` (each None, an id, or a list of ids: how configs name EOS), sorted."""
    ids: set[int] = set()
    for candidate in candidates:
        if isinstance(candidate, int):
            ids.add(candidate)
        elif isinstance(candidate, (list, tuple)):
            ids.update(int(c) for c in candidate)
    return tuple(sorted(ids))
