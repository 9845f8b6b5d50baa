"""Requests and stream events exchanged with the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from wombat_core.engine.sampling import SamplingParams


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    truncated_prompt_tokens: int = 0


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()
    text: str = ""  # the token decoded on its own


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    truncated_prompt_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class StreamEvent:
    """New output of one request. The last event of a request has `finish_reason`, `usage` and `timings`."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    error: Exception | None = field(default=None, compare=False)
    emitted_at: float = field(default=0.0, compare=False)  # time.monotonic() when the engine made it
    seed: int | None = None  # on the last event: the seed the request sampled with (its own or drawn)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None
