"""The engine seam: what the inference service sees of an engine, and the in-house engine behind it.

Two implementations share this interface: `WombatBackend` (wombat_core/engine/engine.py, the default on
CPU and the reference) and `VllmBackend` (vllm_backend.py, vLLM's AsyncLLM, for GPUs). Everything above
the seam is the same for both: prompt templating and tokenisation (with the backend's tokenizer), request
validation and its messages, truncation, the bounded queue's RESOURCE_EXHAUSTED, GetLoad, metrics and
health. A backend takes token-id prompts and validated `SamplingParams` and streams `StreamEvent`s.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from wombat_core.engine.engine import Engine, EngineConfig, EngineStats
from wombat_core.engine.loading import LoadedModel, load_for_serving
from wombat_core.engine.sampling import SamplingParams
from wombat_core.engine.types import GenerationRequest, StreamEvent

log = logging.getLogger(__name__)

# Warm-up requests run every sampler path (greedy; seeded sampling with top-k/top-p/min-p, repetition
# penalty and min-new-tokens; penalties, bias and logprobs of the output and the prompt), so a model or
# device that cannot sample fails before the pod says SERVING.
WARM_UP = (
    SamplingParams(temperature=0, max_new_tokens=2),
    SamplingParams(
        temperature=0.7,
        top_k=20,
        top_p=0.9,
        min_p=0.01,
        repetition_penalty=1.1,
        min_new_tokens=2,
        max_new_tokens=2,
        seed=0,
    ),  # fmt: skip
    # OpenAI's penalties and logit_bias, and prompt logprobs (the LM head over every prompt position).
    SamplingParams(
        temperature=0,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias=((0, 1.0),),
        prompt_logprobs=1,
        logprobs=True,
        top_logprobs=1,
        max_new_tokens=2,
    ),  # fmt: skip
)


@dataclass(frozen=True)
class ModelFacts:
    """What ModelInfo reports and what validation above the seam needs."""

    name: str
    model_type: str
    context_length: int  # prompt + output, after --max-model-len
    vocab_size: int  # ids a prompt or stop_token_ids may hold: < this
    dtype: str
    device: str
    eos_token_ids: tuple[int, ...]
    max_batch_size: int
    max_queue: int


@dataclass(frozen=True)
class BackendSettings:
    """What both backends are built from (the service's flags)."""

    model_dir: Path
    dtype: str = "auto"
    device: str = "auto"
    max_batch_size: int = 8
    max_queue: int = 64
    max_prefill_tokens: int = 512
    max_new_tokens_limit: int = 4096
    max_model_len: int | None = None  # caps the model's context (vLLM's name)
    gpu_memory_utilization: float = 0.9
    cpu_threads: int | None = None
    admission_wait_s: float = 0.010  # the in-house engine's (EngineConfig); vLLM schedules on its own


class EngineBackend(abc.ABC):
    """One engine behind the inference service."""

    kind: str  # "wombat" or "vllm"
    facts: ModelFacts
    tokenizer: object  # Hugging Face tokenizer: templating and tokenisation above the seam use it

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[list[StreamEvent]]:
        """Submits now (a full queue raises ResourceExhausted here, bad ids InvalidArgument) and streams
        the request's events in lists, the last ending it; an engine failure is raised. Closing the
        iterator early (use `contextlib.aclosing`) cancels the request within a step."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Waiting and running requests and KV-cache use, cheap (GetLoad and the gauges read it)."""

    @abc.abstractmethod
    def set_on_finish(self, callback: Callable[[StreamEvent], None]) -> None:
        """`callback` gets every request's final event (cancellations included), for metrics."""

    @abc.abstractmethod
    async def wait_until_failed(self) -> BaseException:
        """Returns the failure that killed the engine; never returns while it is healthy."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stops the engine; requests still in flight get UNAVAILABLE."""

    async def warm_up(self) -> None:
        """Runs WARM_UP through the engine, so a model that cannot generate fails before SERVING."""
        prompt = tuple(self.tokenizer("warm-up")["input_ids"]) or (0,)
        for number, params in enumerate(WARM_UP):
            async for _ in self.generate(GenerationRequest(f"warm-up-{number}", prompt, params)):
                pass


class WombatBackend(EngineBackend):
    """The in-house continuous-batching engine."""

    kind = "wombat"

    def __init__(self, loaded: LoadedModel, engine: Engine):
        self.loaded, self.engine, self.tokenizer = loaded, engine, loaded.tokenizer
        self.facts = ModelFacts(
            name=loaded.name,
            model_type=loaded.model_type,
            context_length=engine.config.context_length,
            vocab_size=engine.vocab_size,
            dtype=loaded.dtype,
            device=loaded.device,
            eos_token_ids=engine.eos_token_ids,
            max_batch_size=engine.config.max_batch_size,
            max_queue=engine.config.max_queue,
        )

    @classmethod
    def load(cls, settings: BackendSettings) -> WombatBackend:
        """Loads the weights and starts the engine (blocking: call it in a thread).

        Loading runs single-threaded and the engine thread gets the cores: one multi-threaded OpenMP team
        per process (EngineConfig.cpu_threads says why)."""
        torch.set_num_threads(1)
        loaded = load_for_serving(settings.model_dir, dtype=settings.dtype, device=settings.device,
                                  packed_kernels=True)  # fmt: skip
        context = min(loaded.context_length, settings.max_model_len or loaded.context_length)
        engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            max_prefill_tokens=settings.max_prefill_tokens,
            context_length=context,
            max_new_tokens_limit=settings.max_new_tokens_limit,
            cpu_threads=settings.cpu_threads,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            admission_wait_s=settings.admission_wait_s,
        ))  # fmt: skip
        engine.start()
        return cls(loaded, engine)

    def generate(self, request: GenerationRequest) -> AsyncIterator[list[StreamEvent]]:
        return self.engine.generate_async(request)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def set_on_finish(self, callback: Callable[[StreamEvent], None]) -> None:
        self.engine.on_finish = callback

    async def wait_until_failed(self) -> BaseException:
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[BaseException] = loop.create_future()

        def report(error: BaseException) -> None:  # the engine thread
            loop.call_soon_threadsafe(lambda: failed.done() or failed.set_result(error))

        self.engine.on_death.append(report)
        if self.engine.failure is not None:  # it died before we listened
            return self.engine.failure
        return await failed

    async def stop(self) -> None:
        await asyncio.to_thread(self.engine.stop)
