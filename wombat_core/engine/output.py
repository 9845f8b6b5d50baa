"""The output processor: turns each row's sampled token into the request's stream event (after vLLM v1's
OutputProcessor). It owns the per-request state the host needs: detokenisation, stop conditions,
logprob token texts, final events and timings. It never touches a tensor.

Order of the stop checks for one new token (vLLM's):
  1. a non-finite logits row (the sampler reports it as token -1): the request fails, no token;
  2. EOS (unless ignore_eos): its text is never emitted;
  3. a stop token id: ends the request, its text is not emitted (vLLM's default
     include_stop_str_in_output=False);
  4. the text: a stop string at its earliest occurrence ends it, the stop string excluded;
  5. max_new_tokens, or prompt + output reaching the context: LENGTH.
A request with max_new_tokens 0 (it only scores its prompt) ends at its first token, which is dropped:
its one event carries the prompt logprobs, no token and LENGTH.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from wombat_core.engine.detokenizer import (
    LOGPROB_CONTEXT,
    IncrementalDetokenizer,
    PromptScore,
    added_text,
    name_prompt_logprobs,
)
from wombat_core.engine.types import (
    GRAMMAR_REFUSED,
    NON_FINITE,
    FinishReason,
    GenerationRequest,
    StreamEvent,
    Timings,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from wombat_core.errors import WombatError

Sink = Callable[[StreamEvent], None]


class NonFiniteLogits(WombatError):
    """The model produced NaN or infinite logits for a request (typically a float16 overflow)."""

    reason = "NON_FINITE_LOGITS"


class GrammarRefused(WombatError):
    """A constrained request's grammar refused the token its mask allowed (a bug in the grammar engine)."""

    reason = "GRAMMAR_REFUSED"


@dataclass
class RequestState:
    """What the host keeps for one request from arrival to its final event."""

    request: GenerationRequest
    sink: Sink
    seed: int  # the request's, or a random one: sampling is a pure function of it
    detokenizer: IncrementalDetokenizer
    arrived: float
    scheduled: float = 0.0
    first_token: float = 0.0
    generated: list[int] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # ride on the first event
    matcher: object | None = None  # llguidance's, when the output is constrained (grammar.py)

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def prompt_length(self) -> int:
        return len(self.request.prompt_token_ids)


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], context_length: int):
        self.tokenizer, self.eos_token_ids, self.context_length = tokenizer, eos_token_ids, context_length

    def new_request(self, request: GenerationRequest, sink: Sink) -> RequestState:
        params = request.params
        return RequestState(
            request=request,
            sink=sink,
            seed=params.seed if params.seed is not None else secrets.randbits(63),
            detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.stop),
            arrived=time.monotonic(),
        )

    def process(
        self, state: RequestState, token: int, logprob: TokenLogprob | None, now: float
    ) -> StreamEvent:
        """The event for one new token of `state`; a finished one (final or failed) ends the request."""
        if token == GRAMMAR_REFUSED:
            return self.failed(state, GrammarRefused(
                f"request {state.id}: its structured_output grammar refused a token it allowed, after "
                f"{len(state.generated)} tokens; retry, and report the schema if it persists"
            ))  # fmt: skip
        if token == NON_FINITE:
            return self.failed(state, NonFiniteLogits(
                f"the model produced NaN or infinite logits for request {state.id} after "
                f"{len(state.generated)} tokens (a float16 overflow?); serve the model in bfloat16 or float32"
            ))  # fmt: skip
        if not state.first_token:
            state.first_token = now
        prompt_logprobs, state.prompt_logprobs = state.prompt_logprobs, ()
        if state.request.params.max_new_tokens == 0:
            return self.final(state, FinishReason.LENGTH, now=now, prompt_logprobs=prompt_logprobs)
        logprobs = (self._with_texts(state, logprob),) if logprob else ()
        state.generated.append(token)
        reason, text = self._advance(state, token)
        if reason is None:
            return StreamEvent(
                state.id, (token,), text, logprobs, emitted_at=now, prompt_logprobs=prompt_logprobs
            )
        return self.final(state, reason, text=text, token_ids=(token,), logprobs=logprobs, now=now,
                          prompt_logprobs=prompt_logprobs)  # fmt: skip

    def _advance(self, state: RequestState, token: int) -> tuple[FinishReason | None, str]:
        params, detokenizer = state.request.params, state.detokenizer
        if not params.ignore_eos and token in self.eos_token_ids:
            return FinishReason.EOS, detokenizer.flush()
        if token in params.stop_token_ids:
            return FinishReason.STOP, detokenizer.flush()
        text, stopped = detokenizer.add(token)
        if stopped:
            return FinishReason.STOP, text
        total = state.prompt_length + len(state.generated)
        if len(state.generated) >= params.max_new_tokens or total >= self.context_length:
            return FinishReason.LENGTH, text + detokenizer.flush()
        return None, text

    def set_prompt_logprobs(self, state: RequestState, entries: list[PromptScore]) -> None:
        """The prompt's scores from its second token on; they go out with the first event."""
        state.prompt_logprobs = name_prompt_logprobs(self.tokenizer, state.request.prompt_token_ids, entries)

    def _with_texts(self, state: RequestState, logprob: TokenLogprob) -> TokenLogprob:
        """Names each token by the text it adds after what precedes it, so that a SentencePiece "▁the" is
        " the" (decoded alone it would be "the") and the texts of a completion's tokens add up to its text
        (OpenAI's `tokens` and `text_offset`). Only for requests that asked for logprobs."""
        context = [*state.request.prompt_token_ids, *state.generated][-LOGPROB_CONTEXT:]

        def text(token_id: int) -> str:
            return added_text(self.tokenizer, context, token_id)

        top = tuple(TopLogprob(t.token_id, text(t.token_id), t.logprob) for t in logprob.top)
        return TokenLogprob(logprob.token_id, logprob.logprob, top, text(logprob.token_id))

    def final(self, state: RequestState, reason: FinishReason, *, text: str = "", token_ids: tuple[int, ...] = (),
              logprobs: tuple[TokenLogprob, ...] = (), now: float | None = None,
              prompt_logprobs: tuple[TokenLogprob, ...] = ()) -> StreamEvent:  # fmt: skip
        now = time.monotonic() if now is None else now
        scheduled = state.scheduled or now
        timings = Timings(
            queue_seconds=scheduled - state.arrived,
            time_to_first_token_seconds=(state.first_token or now) - state.arrived,
            total_seconds=now - state.arrived,
        )
        usage = Usage(
            prompt_tokens=state.prompt_length,
            completion_tokens=len(state.generated),
            truncated_prompt_tokens=state.request.truncated_prompt_tokens,
        )
        return StreamEvent(state.id, token_ids, text, logprobs, reason, usage, timings, emitted_at=now,
                           seed=state.seed, prompt_logprobs=prompt_logprobs)  # fmt: skip

    @staticmethod
    def failed(state: RequestState, error: Exception) -> StreamEvent:
        return StreamEvent(state.id, (), "", error=error, emitted_at=time.monotonic())
