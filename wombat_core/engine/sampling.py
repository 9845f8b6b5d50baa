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
# A temperature below this is greedy (vLLM's _SAMPLING_EPS): dividing float32 logits by 1e-50 gives
# infinities (or, as a float32 temperature, a division by zero), never a sharper distribution.
GREEDY_BELOW = 1e-5


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
        if self.max_new_tokens < 1:
            fail(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
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

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def check_against_model(self, vocab_size: int, max_new_tokens_limit: int) -> None:
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise InvalidArgument(
                f"stop_token_ids must be < vocab size {vocab_size}, got {bad}",
                metadata={"field": "stop_token_ids"},
            )
        if self.max_new_tokens > max_new_tokens_limit:
            raise InvalidArgument(
                f"max_new_tokens must be <= {max_new_tokens_limit} on this server, got {self.max_new_tokens}",
                metadata={"field": "max_new_tokens"},
            )
