"""Structured output: a request's output constrained to a JSON schema, any JSON object or a regular
expression, by llguidance (the Rust constrained-decoding library vLLM also uses) as a token mask.

`Grammars` holds the served tokenizer as llguidance sees it (made once, on the first constrained request)
and compiles each request's structure into a matcher when the request is submitted, so an invalid schema
is INVALID_ARGUMENT at once, naming `structured_output`, before it takes a slot. `GrammarMasks` is the
sampler's part: each step it asks every constrained row's matcher for the tokens that keep the output a
valid prefix (a bitmask on the host, one bit per token, ~6 KB a row for a 49k vocabulary), moves the
masks to the logits' device in one copy, and sets every other token's score to -inf, batched, before any
other processing (vLLM's order). After the step, each matcher consumes its row's token. EOS is allowed
only where the structure is complete, so a constrained output ends by itself; one cut by max_new_tokens
may be incomplete, as on vLLM.

JSON is generated compact (llguidance's `whitespace_flexible: false`): a small model given free
whitespace can fill its whole budget with newlines.
"""

from __future__ import annotations

import json
import threading

import torch

from wombat_core.engine.sampling import StructuredOutput
from wombat_core.errors import InvalidArgument

_JSON_DEFAULTS = {"whitespace_flexible": False}


class Grammars:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._hf_tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, eos_token_ids
        self._tokenizer = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        import llguidance.hf

        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=list(self.eos_token_ids) or None
                )
            return self._tokenizer

    def matcher(self, structured: StructuredOutput):
        """A fresh llguidance matcher for one request; InvalidArgument naming the field if it cannot be built."""
        import llguidance

        try:
            if structured.kind == "json_schema":
                json.loads(structured.spec)  # a clear message for text that is not JSON at all
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    structured.spec, defaults=_JSON_DEFAULTS
                )
            elif structured.kind == "json_object":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    '{"type": "object"}', defaults=_JSON_DEFAULTS
                )
            else:
                grammar = llguidance.grammar_from("regex", structured.spec)
            matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        except (ValueError, TypeError) as exc:
            raise _invalid(structured, str(exc)) from None
        if matcher.is_error():
            raise _invalid(structured, matcher.get_error())
        return matcher


def _invalid(structured: StructuredOutput, why: str) -> InvalidArgument:
    return InvalidArgument(f"structured_output {structured.kind} cannot be used: {why}",
                           metadata={"field": "structured_output"})  # fmt: skip


class GrammarMasks:
    """The sampler's token masks for constrained rows, indexed like the sampler's rows."""

    def __init__(self, slots: int, vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self.words = (vocab_size + 31) // 32
        self.matchers: list = [None] * slots
        self._host = torch.full((slots, self.words), -1, dtype=torch.int32)  # llguidance fills on the host
        self._shifts = torch.arange(32, dtype=torch.int32, device=device)

    def any(self, rows: slice) -> bool:
        return any(m is not None for m in self.matchers[rows])

    def apply(self, scores: torch.Tensor, rows: slice) -> torch.Tensor:
        """`scores` [rows, vocab] with every token the rows' structures forbid at -inf."""
        import llguidance.torch

        masks = self._host[: rows.stop - rows.start]
        masks.fill_(-1)  # unconstrained rows allow everything
        for index, matcher in enumerate(self.matchers[rows]):
            if matcher is not None:
                llguidance.torch.fill_next_token_bitmask(matcher, masks, index)
        words = masks.to(self.device, non_blocking=True)
        allowed = ((words[:, :, None] >> self._shifts) & 1).reshape(words.shape[0], -1)[:, : scores.shape[1]]
        return scores.masked_fill(allowed == 0, float("-inf"))

    def accept(self, first: int, tokens: list[int]) -> list[int]:
        """Each constrained row's matcher consumes its token; returns the rows whose matcher refused it."""
        refused = []
        for row, token in enumerate(tokens, start=first):
            matcher = self.matchers[row]
            if matcher is None or token < 0 or matcher.is_stopped():  # < 0: a failed row, already lost
                continue
            if not matcher.consume_token(token):
                refused.append(row)
        return refused

    def move_rows(self, moves: list[tuple[int, int]]) -> None:
        for destination, source in moves:
            self.matchers[destination] = self.matchers[source]
