"""The engine loop: one thread that schedules, runs the model and emits stream events.

Each iteration:
  1. applies cancellations (a cancelled request leaves the batch before the next decode step);
  2. if no prefill group is in flight and slots are free, forms one from the head of the waiting queue
     (FIFO, bounded by `max_prefill_tokens`);
  3. runs one prefill chunk of that group; when it completes, samples each newcomer's first token and
     moves the group next to the running rows;
  4. runs one decode step for the running rows, samples every row's next token in one batched call,
     and emits them.
So a newcomer's prefill delays running streams by at most one chunk, and finished rows leave at once.
The runner owns the model and the KV cache, the sampler owns the per-row sampling state; the engine
keeps its list of sequences in their row order and tells both when rows join or leave.

Callers use `generate()` (a blocking iterator, any thread) or `generate_async()` (asyncio); both are thin
bridges over `submit(request, sink)`, whose `sink(event)` is called on the engine thread and must not block.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import torch

from wombat_core.engine.detokenizer import IncrementalDetokenizer
from wombat_core.engine.kv_cache import compaction_moves
from wombat_core.engine.runner import ModelRunner, PrefillGroup
from wombat_core.engine.sampler import BatchSampler
from wombat_core.engine.types import (
    FinishReason,
    GenerationRequest,
    StreamEvent,
    Timings,
    TokenLogprob,
    Usage,
)
from wombat_core.errors import InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

Sink = Callable[[StreamEvent], None]


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 8
    max_queue: int = 64  # waiting requests beyond the running batch; more are refused at once
    max_prefill_tokens: int = 512  # tokens per prefill chunk (over all rows of the group)
    context_length: int = 2048
    max_new_tokens_limit: int = 4096
    # Intra-op threads of the engine thread; None leaves torch's setting alone. The engine thread should be
    # the process's only multi-threaded torch user: a second OpenMP team on the same cores slows every op
    # by half (libgomp stops spinning when its threads outnumber the cores), so whoever loads the model
    # for a server loads it single-threaded and gives the engine the cores (services/inference/server.py).
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise InvalidArgument(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        for name in ("max_batch_size", "max_prefill_tokens", "context_length", "max_new_tokens_limit"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise InvalidArgument(f"max_queue must be >= 0, got {self.max_queue}")


@dataclass
class _Sequence:
    request: GenerationRequest
    sink: Sink
    seed: int  # the request's, or a random one: sampling is a pure function of it
    detokenizer: IncrementalDetokenizer
    arrived: float
    scheduled: float = 0.0
    first_token: float = 0.0
    generated: list[int] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.request.request_id


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
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        self.runner = ModelRunner(model, pad, config.max_batch_size, config.context_length)
        self.sampler = BatchSampler(config.max_batch_size, model.config.vocab_size, self.runner.device)
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._cancelled: set[str] = set()
        self._decode_steps = 0
        self._group: PrefillGroup | None = None
        self._group_sequences: list[_Sequence] = []  # the group's live newcomers
        self._group_rows: list[int] = []  # and their rows within the group (cancelled ones are left out)
        self._running: list[_Sequence] = []  # in row order: row i of the runner and the sampler
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = (
            weakref.WeakKeyDictionary()
        )
        # Called on the engine thread with every request's final event (cancellations included): metrics.
        self.on_finish: Callable[[StreamEvent], None] | None = None

    # --- public API (any thread) -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="wombat-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(30)

    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        """Queues a request. Raises ResourceExhausted at once when the waiting queue is full."""
        params = request.params
        params.check_against_model(self.vocab_size, self.config.max_new_tokens_limit)
        if not request.prompt_token_ids:
            raise InvalidArgument("the prompt is empty after templating and tokenisation")
        if len(request.prompt_token_ids) >= self.config.context_length:
            raise InvalidArgument(
                f"the prompt has {len(request.prompt_token_ids)} tokens but the model's context is "
                f"{self.config.context_length}; shorten it or set truncate_left_tokens",
                metadata={"field": "prompt"},
            )
        sequence = _Sequence(
            request=request,
            sink=sink,
            seed=params.seed if params.seed is not None else secrets.randbits(63),
            detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.stop),
            arrived=time.monotonic(),
        )
        with self._lock:
            if self._stopping:
                raise Unavailable("the engine is shutting down")
            free_slots = self.config.max_batch_size - len(self._running) - len(self._group_sequences)
            if len(self._waiting) >= self.config.max_queue + max(0, free_slots):
                raise ResourceExhausted(
                    f"the server is at capacity ({len(self._waiting)} requests waiting, "
                    f"{len(self._running)} running); retry with backoff",
                    metadata={"retry_after_seconds": "1"},
                )
            self._waiting.append(sequence)
            self._lock.notify_all()

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
        with self._lock:
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
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify_all()

    def stats(self) -> EngineStats:
        return EngineStats(len(self._waiting), len(self._group_sequences), len(self._running), self._decode_steps,
                           self.runner.cache_usage())  # fmt: skip

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    # --- the loop (engine thread) ------------------------------------------------------------------

    def _loop(self) -> None:
        if self.config.cpu_threads is not None:
            torch.set_num_threads(self.config.cpu_threads)
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not (
                    self._waiting or self._group or self._running or self._cancelled or self._stopping
                ):
                    self._lock.wait()
                if self._stopping:
                    break
                cancelled, self._cancelled = self._cancelled, set()
            try:
                self._iterate(cancelled)
            except Exception as exc:  # noqa: BLE001 - a model failure fails its requests, not the server
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(exc)
        self._fail_all(Unavailable("the engine stopped"), include_waiting=True)

    def _iterate(self, cancelled: set[str]) -> None:
        if cancelled:
            self._apply_cancellations(cancelled)
        if self._group is None:
            self._form_group()
        if self._group is not None:
            self._prefill_step()
        if self._running:
            self._decode_step()

    def _apply_cancellations(self, ids: set[str]) -> None:
        """Takes the cancelled requests out of the queue, the prefill group and the running rows, then
        sends each its CANCELLED final event (slots first, as in `_emit_and_retire`)."""
        with self._lock:
            cancelled = [s for s in self._waiting if s.id in ids]
            self._waiting = collections.deque(s for s in self._waiting if s.id not in ids)
        if self._group is not None and any(s.id in ids for s in self._group_sequences):
            # A cancelled newcomer's row stays in the group's prefill (a chunk or two of waste) and is
            # left behind when the group completes; an empty group is dropped at once.
            cancelled += [s for s in self._group_sequences if s.id in ids]
            kept = [
                (s, row)
                for s, row in zip(self._group_sequences, self._group_rows, strict=True)
                if s.id not in ids
            ]
            self._group_sequences, self._group_rows = [s for s, _ in kept], [row for _, row in kept]
            if not kept:
                self._group = None
        if any(s.id in ids for s in self._running):
            cancelled += [s for s in self._running if s.id in ids]
            self._retire([row for row, s in enumerate(self._running) if s.id in ids])
        for sequence in cancelled:
            self._deliver(sequence, self._final_event(sequence, FinishReason.CANCELLED))

    def _form_group(self) -> None:
        free = self.config.max_batch_size - len(self._running)
        chosen: list[_Sequence] = []
        with self._lock:
            longest = 0
            while self._waiting and len(chosen) < free:
                candidate = len(self._waiting[0].request.prompt_token_ids)
                padded = max(longest, candidate) * (len(chosen) + 1)
                if chosen and padded > self.config.max_prefill_tokens:
                    break
                longest = max(longest, candidate)
                chosen.append(self._waiting.popleft())
        if chosen:
            now = time.monotonic()
            for sequence in chosen:
                sequence.scheduled = now
            prompts = [s.request.prompt_token_ids for s in chosen]
            self._group = self.runner.new_group(prompts, max(s.request.params.max_new_tokens for s in chosen))
            self._group_sequences, self._group_rows = chosen, list(range(len(chosen)))

    def _prefill_step(self) -> None:
        group = self._group
        assert group is not None
        logits = self.runner.prefill_chunk(group, self.config.max_prefill_tokens)
        if logits is None:
            return
        sequences, rows = self._group_sequences, self._group_rows
        self._group, self._group_sequences, self._group_rows = None, [], []
        first = self.runner.complete_group(group, rows)
        self.sampler.add_rows(first, [self._sampling_row(s) for s in sequences])
        self._running.extend(sequences)
        if len(rows) < group.rows:
            logits = logits[torch.tensor(rows, device=logits.device)]
        self._sample_and_emit(logits, slice(first, first + len(sequences)))

    def _sampling_row(self, sequence: _Sequence) -> tuple:
        params = sequence.request.params
        eos = () if params.ignore_eos else self.eos_token_ids
        return params, sequence.seed, sequence.request.prompt_token_ids, eos

    def _decode_step(self) -> None:
        logits = self.runner.decode()
        self._decode_steps += 1
        self._sample_and_emit(logits, slice(0, len(self._running)))

    def _sample_and_emit(self, logits: torch.Tensor, rows: slice) -> None:
        """One batched sampler call for `rows`, one host transfer, then the rows' events."""
        output = self.sampler.sample(logits, rows)
        self.runner.set_last_tokens(rows.start, output.tokens)
        tokens, logprobs = output.to_host()
        self._emit_and_retire(rows.start, tokens, logprobs)

    def _emit_and_retire(self, first: int, tokens: list[int], logprobs: list[TokenLogprob | None]) -> None:
        """Emits each row's new token. Finished rows leave *before* their final events go out, so a caller
        that submits again on seeing its final event finds the slot free."""
        finished_rows, events = [], []
        now = time.monotonic()
        for row, token, logprob in zip(range(first, first + len(tokens)), tokens, logprobs, strict=True):
            sequence = self._running[row]
            sequence.generated.append(token)
            if not sequence.first_token:
                sequence.first_token = now
            reason, text = self._advance(sequence, token)
            token_logprobs = (self._with_texts(logprob),) if logprob else ()
            if reason is None:
                events.append(
                    (sequence, StreamEvent(sequence.id, (token,), text, token_logprobs, emitted_at=now))
                )
            else:
                final = self._final_event(
                    sequence, reason, text=text, token_ids=(token,), logprobs=token_logprobs
                )
                events.append((sequence, final))
                finished_rows.append(row)
        if finished_rows:
            self._retire(finished_rows)
        for sequence, event in events:
            self._deliver(sequence, event)

    def _advance(self, sequence: _Sequence, token: int) -> tuple[FinishReason | None, str]:
        params = sequence.request.params
        if not params.ignore_eos and token in self.eos_token_ids:
            return FinishReason.EOS, sequence.detokenizer.flush()
        text, stopped = sequence.detokenizer.add(token)
        if stopped:
            return FinishReason.STOP, text
        if token in params.stop_token_ids:
            return FinishReason.STOP, text + sequence.detokenizer.flush()
        total = len(sequence.request.prompt_token_ids) + len(sequence.generated)
        if len(sequence.generated) >= params.max_new_tokens or total >= self.config.context_length:
            return FinishReason.LENGTH, text + sequence.detokenizer.flush()
        return None, text

    def _with_texts(self, logprob: TokenLogprob) -> TokenLogprob:
        """Each token's own text (OpenAI's logprobs name tokens by text); only for requests that asked."""
        top = tuple(type(t)(t.token_id, self.tokenizer.decode([t.token_id]), t.logprob) for t in logprob.top)
        return TokenLogprob(logprob.token_id, logprob.logprob, top, self.tokenizer.decode([logprob.token_id]))

    def _retire(self, rows: list[int]) -> None:
        """Rows leave: the runner, the sampler and this list apply the same compaction moves."""
        remaining = len(self._running) - len(rows)
        moves = compaction_moves(len(self._running), rows)
        self.runner.move_rows(moves, remaining)
        self.sampler.move_rows(moves)
        for destination, source in moves:
            self._running[destination] = self._running[source]
        del self._running[remaining:]

    def _final_event(
        self,
        sequence: _Sequence,
        reason: FinishReason,
        *,
        text: str = "",
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[TokenLogprob, ...] = (),
    ) -> StreamEvent:
        now = time.monotonic()
        scheduled = sequence.scheduled or now
        timings = Timings(
            queue_seconds=scheduled - sequence.arrived,
            time_to_first_token_seconds=(sequence.first_token or now) - sequence.arrived,
            total_seconds=now - sequence.arrived,
        )
        usage = Usage(
            prompt_tokens=len(sequence.request.prompt_token_ids),
            completion_tokens=len(sequence.generated),
            truncated_prompt_tokens=sequence.request.truncated_prompt_tokens,
        )
        return StreamEvent(sequence.id, token_ids, text, logprobs, reason, usage, timings, emitted_at=now,
                           seed=sequence.seed)  # fmt: skip

    def _deliver(self, sequence: _Sequence, event: StreamEvent) -> None:
        sequence.sink(event)
        if event.finish_reason is not None and self.on_finish is not None:
            self.on_finish(event)

    def _fail_all(self, error: Exception, include_waiting: bool = False) -> None:
        victims = self._running + self._group_sequences
        if include_waiting:
            with self._lock:
                victims += list(self._waiting)
                self._waiting.clear()
        self._running, self._group_sequences, self._group_rows, self._group = [], [], [], None
        self.runner.move_rows([], 0)  # no running rows; the cache's contents no longer matter
        for sequence in victims:
            sequence.sink(StreamEvent(sequence.id, (), "", error=error))


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
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    for candidate in (configured, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            ids.add(candidate)
        elif isinstance(candidate, (list, tuple)):
            ids.update(int(c) for c in candidate)
    return tuple(sorted(ids))
