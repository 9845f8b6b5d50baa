"""The engine loop: one thread that schedules, runs the model and emits stream events.

Each iteration:
  1. applies cancellations (a cancelled request leaves the batch before the next decode step);
  2. if no prefill group is in flight and slots are free, forms one from the head of the waiting queue
     (FIFO, bounded by `max_prefill_tokens`);
  3. runs one prefill chunk of that group; when it completes, samples each newcomer's first token and
     merges the group into the running batch;
  4. runs one decode step for the running batch and emits each row's new token.
So a newcomer's prefill delays running streams by at most one chunk, and finished rows leave at once.

Callers use `generate()` (a blocking iterator, any thread) or `generate_async()` (asyncio); both are thin
bridges over `submit(request, sink)`, whose `sink(event)` is called on the engine thread and must not block.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import torch

from wombat_core.engine.detokenizer import IncrementalDetokenizer
from wombat_core.engine.runner import KVBatch, ModelRunner, PrefillGroup, keep_rows, merge
from wombat_core.engine.sampler import RequestSampler
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

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_prefill_tokens", "context_length", "max_new_tokens_limit"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise InvalidArgument(f"max_queue must be >= 0, got {self.max_queue}")


@dataclass
class _Sequence:
    request: GenerationRequest
    sink: Sink
    sampler: RequestSampler
    detokenizer: IncrementalDetokenizer
    arrived: float
    scheduled: float = 0.0
    first_token: float = 0.0
    generated: list[int] = field(default_factory=list)
    pending_logprob: TokenLogprob | None = None  # of the token sampled this step, when requested

    @property
    def id(self) -> str:
        return self.request.request_id


@dataclass
class EngineStats:
    waiting: int
    prefilling: int
    running: int
    decode_steps: int = 0  # since start: a clock for "freed within one step"


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, config: EngineConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.eos_token_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        self.runner = ModelRunner(model, pad)
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._cancelled: set[str] = set()
        self._decode_steps = 0
        self._group: PrefillGroup | None = None
        self._group_sequences: list[_Sequence] = []
        self._batch: KVBatch | None = None
        self._running: list[_Sequence] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
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
            sampler=RequestSampler(
                params, request.prompt_token_ids, () if params.ignore_eos else self.eos_token_ids
            ),
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
                    f"{len(self._running)} running); retry with backoff"
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
        inbox: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.submit(request, lambda event: loop.call_soon_threadsafe(inbox.put_nowait, event))

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
        return EngineStats(
            len(self._waiting), len(self._group_sequences), len(self._running), self._decode_steps
        )

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    # --- the loop (engine thread) ------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
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
        """Takes the cancelled requests out of the queue, the prefill group and the running batch, then
        sends each its CANCELLED final event (slots first, as in `_emit_and_retire`)."""
        with self._lock:
            cancelled = [s for s in self._waiting if s.id in ids]
            self._waiting = collections.deque(s for s in self._waiting if s.id not in ids)
        if self._group is not None and any(s.id in ids for s in self._group_sequences):
            keep = [i for i, s in enumerate(self._group_sequences) if s.id not in ids]
            cancelled += [s for s in self._group_sequences if s.id in ids]
            if keep:
                self._group.drop_rows(keep)
                self._group_sequences = [self._group_sequences[i] for i in keep]
            else:
                self._group, self._group_sequences = None, []
        if any(s.id in ids for s in self._running):
            cancelled += [s for s in self._running if s.id in ids]
            self._keep_running([i for i, s in enumerate(self._running) if s.id not in ids])
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
            self._group = self.runner.new_group([s.request.prompt_token_ids for s in chosen])
            self._group_sequences = chosen

    def _prefill_step(self) -> None:
        group = self._group
        assert group is not None
        logits = self.runner.prefill_chunk(group, self.config.max_prefill_tokens)
        if logits is None:
            return
        sequences, self._group, self._group_sequences = self._group_sequences, None, []
        tokens = [self._sample(sequence, logits[row]) for row, sequence in enumerate(sequences)]
        newcomers = self.runner.complete_group(group, torch.tensor(tokens, device=group.mask.device))
        self._batch = merge(self._batch, newcomers)
        self._running.extend(sequences)
        self._emit_and_retire(sequences, tokens, offset=len(self._running) - len(sequences))

    def _decode_step(self) -> None:
        assert self._batch is not None
        logits = self.runner.decode(self._batch)
        tokens = [self._sample(sequence, logits[row]) for row, sequence in enumerate(self._running)]
        self._batch.last_tokens = torch.tensor(tokens, device=logits.device)
        self._decode_steps += 1
        self._emit_and_retire(list(self._running), tokens, offset=0)

    def _sample(self, sequence: _Sequence, logits: torch.Tensor) -> int:
        token, logprob = sequence.sampler.next_token(logits)
        sequence.generated.append(token)
        sequence.pending_logprob = logprob
        return token

    def _emit_and_retire(self, sequences: list[_Sequence], tokens: list[int], offset: int) -> None:
        """Emits each sequence's new token. Finished rows leave the running batch *before* their final
        events go out, so a caller that submits again on seeing its final event finds the slot free."""
        finished_rows, events = [], []
        now = time.monotonic()
        for index, (sequence, token) in enumerate(zip(sequences, tokens, strict=True)):
            if not sequence.first_token:
                sequence.first_token = now
            reason, text = self._advance(sequence, token)
            logprob = sequence.pending_logprob
            logprobs = (self._with_top_text(logprob),) if logprob else ()
            if reason is None:
                events.append((sequence, StreamEvent(sequence.id, (token,), text, logprobs, emitted_at=now)))
            else:
                final = self._final_event(sequence, reason, text=text, token_ids=(token,), logprobs=logprobs)
                events.append((sequence, final))
                finished_rows.append(offset + index)
        if finished_rows:
            finished = set(finished_rows)
            self._keep_running([i for i in range(len(self._running)) if i not in finished])
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

    def _with_top_text(self, logprob: TokenLogprob) -> TokenLogprob:
        if not logprob.top:
            return logprob
        top = tuple(type(t)(t.token_id, self.tokenizer.decode([t.token_id]), t.logprob) for t in logprob.top)
        return TokenLogprob(logprob.token_id, logprob.logprob, top)

    def _keep_running(self, keep: list[int]) -> None:
        assert self._batch is not None
        self._batch = keep_rows(self._batch, keep)
        self._running = [self._running[i] for i in keep]

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
        return StreamEvent(sequence.id, token_ids, text, logprobs, reason, usage, timings, emitted_at=now)

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
        self._running, self._group_sequences, self._group, self._batch = [], [], None, None
        for sequence in victims:
            sequence.sink(StreamEvent(sequence.id, (), "", error=error))


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
