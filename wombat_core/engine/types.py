"""Requests and stream events exchanged with the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from wombat_core.engine.sampling import SamplingParams
from wombat_core.errors import InvalidArgument

# The token the sampler reports for a row whose logits hold NaN or +inf; that request fails.
NON_FINITE = -1
# The token the engine reports for a constrained row whose grammar refused the sampled token; it fails.
GRAMMAR_REFUSED = -2


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

    def check_against_model(self, *, vocab_size: int, context_length: int, max_new_tokens_limit: int) -> None:
        """The checks that depend on the model, the same for every backend (and so are their messages).
        `vocab_size` bounds every id: an id the tokenizer knows but the model's embedding does not would
        be a device-side assert on CUDA, which kills the CUDA context."""
        prompt = self.prompt_token_ids
        self.params.check_against_model(vocab_size, max_new_tokens_limit)
        if not prompt:
            raise InvalidArgument("the prompt is empty after templating and tokenisation")
        if len(prompt) >= context_length:
            raise InvalidArgument(
                f"the prompt has {len(prompt)} tokens but the model's context is {context_length}; "
                "shorten it or set truncate_left_tokens",
                metadata={"field": "prompt"},
            )
        bad = max(prompt) if max(prompt) >= vocab_size else min(prompt)
        if not 0 <= bad < vocab_size:
            raise InvalidArgument(
                f"prompt token ids must be in [0, {vocab_size}) for this model, got {bad}",
                metadata={"field": "prompt"},
            )


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
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # on the first event, when the request asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None
