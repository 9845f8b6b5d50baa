"""Incremental detokenisation that never splits a character, plus stop-sequence matching.

Decoding token by token breaks multi-byte characters (an emoji is often 2-4 byte-level tokens) and
sentencepiece's leading-space handling, so, as in TGI and vLLM, each step decodes a short window of
recent tokens twice (with and without the new ones) and emits only the difference, waiting while the
window ends in an incomplete character (U+FFFD).

Stop sequences are matched on the text, at the earliest occurrence of any of them; up to
`longest stop - 1` characters are held back so a stop string that spans several tokens is never partly
emitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wombat_core.engine.types import TokenLogprob, TopLogprob

REPLACEMENT_CHAR = "\ufffd"
_WINDOW = 6  # tokens of left context; enough to settle spacing and multi-token characters
LOGPROB_CONTEXT = 6  # tokens of left context for a logprob token's text: enough to settle a leading space
# A prompt token's score: (token id, its logprob, [(alternative id, logprob), ...] best first).
PromptScore = tuple[int, float, list[tuple[int, float]]]


def added_text(tokenizer, context: list[int], token_id: int) -> str:
    """The text `token_id` adds after `context`: a SentencePiece "▁the" is " the" (decoded alone it would be
    "the"), so the texts of consecutive tokens add up to the text (OpenAI's `tokens` and `text_offset`)."""
    before = tokenizer.decode(context, skip_special_tokens=True)
    after = tokenizer.decode([*context, token_id], skip_special_tokens=True)
    return after[len(before) :] if after.startswith(before) else after[_common_prefix(before, after) :]


def name_prompt_logprobs(
    tokenizer, prompt: tuple[int, ...], entries: list[PromptScore]
) -> tuple[TokenLogprob, ...]:
    """Prompt logprobs (the last len(entries) tokens of `prompt`) as TokenLogprobs named by `added_text`;
    both backends name them so."""
    names: dict[tuple[int, int], str] = {}

    def text(position: int, token_id: int) -> str:
        if (position, token_id) not in names:
            context = list(prompt[max(0, position - LOGPROB_CONTEXT) : position])
            names[position, token_id] = added_text(tokenizer, context, token_id)
        return names[position, token_id]

    first = len(prompt) - len(entries)
    return tuple(
        TokenLogprob(token, logprob, tuple(TopLogprob(t, text(p, t), lp) for t, lp in top), text(p, token))
        for p, (token, logprob, top) in enumerate(entries, start=first)
    )


def _common_prefix(a: str, b: str) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    prompt_token_ids: tuple[int, ...]
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # all settled output text (stop string excluded once found)
    emitted: int = 0  # characters of `text` already handed out
    _prefix_offset: int = 0
    _read_offset: int = 0

    def __post_init__(self) -> None:
        # Seed the window with the end of the prompt so the first output token gets its spacing right.
        context = list(self.prompt_token_ids[-_WINDOW:])
        self.token_ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._holdback = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token_id: int) -> tuple[str, bool]:
        """Adds one token; returns (new text safe to emit, whether a stop sequence was reached)."""
        self.token_ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(
            self.token_ids[self._prefix_offset : self._read_offset], skip_special_tokens=True
        )
        full_text = decode(self.token_ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            self.text += full_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
        return self._release()

    def _release(self) -> tuple[str, bool]:
        search_from = max(0, self.emitted - self._holdback)
        # The earliest occurrence of any stop string ends the text, whichever comes first in the list.
        found = [i for i in (self.text.find(stop, search_from) for stop in self.stop) if i != -1]
        if found:
            self.text = self.text[: min(found)]
            chunk = self.text[self.emitted :]
            self.emitted = len(self.text)
            return chunk, True
        safe_end = len(self.text) - self._holdback if self.stop else len(self.text)
        if safe_end <= self.emitted:
            return "", False
        chunk = self.text[self.emitted : safe_end]
        self.emitted = safe_end
        return chunk, False

    def flush(self) -> str:
        """At the end of generation: whatever was held back for stop matching."""
        chunk = self.text[self.emitted :]
        self.emitted = len(self.text)
        return chunk
