"""Sampling parameters: one frozen, validated object (after vLLM's SamplingParams).

Values are checked once, in `__post_init__`, with messages that say what was wrong and what is allowed;
model-dependent limits (context length, vocabulary) are checked by `check_against_model`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wombat_core.errors import InvalidArgument

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**63 - 1
MAX_PENALTY = 2.0  # OpenAI's bound on presence_penalty and frequency_penalty (either sign)
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on each logit_bias value (either sign)
MAX_LOGIT_BIAS_ENTRIES = 1024
# A temperature below this is greedy (vLLM's _SAMPLING_EPS): dividing float32 logits by 1e-50 gives
# infinities (or, as a float32 temperature, a division by zero), never a sharper distribution.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class StructuredOutput:
    """A structure the output must follow: `kind` is "json_schema" (spec: the schema as JSON text),
    "json_object" (spec unused) or "regex" (spec: the pattern)."""

    kind: str
    spec: str = ""

    KINDS = ("json_schema", "json_object", "regex")
    MAX_SPEC_CHARS = 1_000_000

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise InvalidArgument(f"structured_output kind must be one of {', '.join(self.KINDS)}, got {self.kind!r}",
                                  metadata={"field": "structured_output"})  # fmt: skip
        if len(self.spec) > self.MAX_SPEC_CHARS or (self.kind != "json_object" and not self.spec):
            raise InvalidArgument(f"structured_output {self.kind} must be 1 to {self.MAX_SPEC_CHARS} characters",
                                  metadata={"field": "structured_output"})  # fmt: skip


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # below GREEDY_BELOW (0 included) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    # Log-probabilities of the prompt's tokens after the first, with this many alternatives; None: none.
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: minus this once for every token the output holds
    frequency_penalty: float = 0.0  # OpenAI's: minus this per occurrence in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the raw logits, ids sorted
    structured: StructuredOutput | None = None  # the output follows this structure (grammar.py)

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise InvalidArgument(message, metadata={"field": message.split(" ", 1)[0]})

        if not math.isfinite(self.temperature) or self.temperature < 0:
            fail(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            fail(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            fail(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            fail(f"min_p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            fail(f"repetition_penalty must be > 0 (1 disables), got {self.repetition_penalty}")
        if self.max_new_tokens < (0 if self.prompt_logprobs is not None else 1):
            fail(f"max_new_tokens must be >= 1 (0 only with prompt_logprobs, to score the prompt), got "
                 f"{self.max_new_tokens}")  # fmt: skip
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            fail(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )
        if len(self.stop) > MAX_STOP_SEQUENCES:
            fail(f"stop may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(self.stop)}")
        for text in self.stop:
            if not text or len(text) > MAX_STOP_CHARS:
                fail(f"stop sequences must be 1 to {MAX_STOP_CHARS} characters, got {len(text)}")
        if any(t < 0 for t in self.stop_token_ids):
            fail(f"stop_token_ids must be >= 0, got {list(self.stop_token_ids)}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            fail(f"seed must be in [0, 2**63 - 1], got {self.seed}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            fail(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            fail(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
                fail(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            fail(f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(self.logit_bias)}")
        for token_id, bias in self.logit_bias:
            if token_id < 0:
                fail(f"logit_bias token ids must be >= 0, got {token_id}")
            if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                fail(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias} "
                     f"for token {token_id}")  # fmt: skip

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalises_output(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    def check_against_model(self, vocab_size: int, max_new_tokens_limit: int) -> None:
        checks = (("stop_token_ids", "stop_token_ids", self.stop_token_ids),
                  ("logit_bias", "logit_bias token ids", [t for t, _ in self.logit_bias]))  # fmt: skip
        for field, what, ids in checks:
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise InvalidArgument(
                    f"{what} must be < vocab size {vocab_size}, got {bad}", metadata={"field": field}
                )
        if self.max_new_tokens > max_new_tokens_limit:
            raise InvalidArgument(
                f"max_new_tokens must be <= {max_new_tokens_limit} on this server, got {self.max_new_tokens}",
                metadata={"field": "max_new_tokens"},
            )
