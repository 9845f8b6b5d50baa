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

REPLACEMENT_CHAR = "\ufffd"
_WINDOW = 6  # tokens of left context; enough to settle spacing and multi-token characters


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
