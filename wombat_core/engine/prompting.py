"""Prompt rendering and tokenisation per request: raw text, the exact Alpaca template, or a chat template."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from wombat_core.errors import InvalidArgument
from wombat_core.prompts import alpaca_prompt

MAX_PROMPT_CHARS = 1_000_000
MAX_PROMPT_TOKEN_IDS = 1_000_000
CHAT_ROLES = ("system", "user", "assistant")


class PromptFormat(enum.Enum):
    RAW = "raw"
    ALPACA = "alpaca"
    CHAT = "chat"


@dataclass(frozen=True)
class PromptSpec:
    format: PromptFormat | None  # None: the server's default
    text: str = ""
    input: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    truncate_left_tokens: int | None = None
    # A prompt given as token ids is used as it is: no template, no tokenisation (vLLM's TokensPrompt).
    token_ids: tuple[int, ...] = ()
    add_special_tokens: bool | None = None  # None: the format's default (raw and alpaca yes, chat no)
    tools_json: str = ""  # chat only: OpenAI's tools list (JSON) for a template that declares tool use

    def __post_init__(self) -> None:
        if self.token_ids:
            if self.format is not None or self.text or self.input or self.messages:
                raise InvalidArgument(
                    "a prompt given as token_ids takes no format, text, input or messages; send one or the other",
                    metadata={"field": "prompt"},
                )
            if len(self.token_ids) > MAX_PROMPT_TOKEN_IDS:
                raise InvalidArgument(
                    f"prompt token_ids may hold at most {MAX_PROMPT_TOKEN_IDS} ids, got {len(self.token_ids)}",
                    metadata={"field": "prompt"},
                )
            if min(self.token_ids) < 0:
                raise InvalidArgument("prompt token_ids must be >= 0", metadata={"field": "prompt"})
        size = len(self.text) + len(self.input) + sum(len(c) for _, c in self.messages) + len(self.tools_json)
        if size > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"prompt must be at most {MAX_PROMPT_CHARS} characters, got {size}")
        if self.truncate_left_tokens is not None and self.truncate_left_tokens < 1:
            raise InvalidArgument(f"truncate_left_tokens must be >= 1, got {self.truncate_left_tokens}")
        for role, _ in self.messages:
            if role not in CHAT_ROLES:
                raise InvalidArgument(
                    f"chat message role must be one of {', '.join(CHAT_ROLES)}, got {role!r}"
                )


@dataclass(frozen=True)
class EncodedPrompt:
    rendered: str
    token_ids: tuple[int, ...]
    truncated_tokens: int


def render(spec: PromptSpec, tokenizer, default: PromptFormat) -> tuple[str, bool]:
    """Returns the prompt text and whether the tokenizer should add its special tokens (BOS)."""
    fmt = spec.format or default
    if fmt is PromptFormat.CHAT:
        if not spec.messages:
            raise InvalidArgument("chat prompts need at least one message in `messages`")
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidArgument("this model's tokenizer has no chat template; use the raw or alpaca format")
        messages = [{"role": role, "content": content} for role, content in spec.messages]
        tools = _tools(spec.tools_json, tokenizer) if spec.tools_json else None
        text = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )
        return text, False
    if spec.tools_json:
        raise InvalidArgument("tools are only for the chat format", metadata={"field": "tools"})
    if spec.messages:
        raise InvalidArgument(f"`messages` is only for the chat format, not {fmt.value}")
    if not spec.text:
        what = "the instruction" if fmt is PromptFormat.ALPACA else "the prompt text"
        raise InvalidArgument(f"`text` ({what}) is empty")
    if fmt is PromptFormat.ALPACA:
        return alpaca_prompt(spec.text, spec.input), True
    if spec.input:
        raise InvalidArgument("`input` is only for the alpaca format")
    return spec.text, True


def declares_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders a `tools` list (as the templates of tool-trained models do)."""
    return bool(chat_template) and "tools" in chat_template


def _tools(tools_json: str, tokenizer) -> list:
    if not declares_tools(getattr(tokenizer, "chat_template", None)):
        raise InvalidArgument("this model's chat template does not declare tool use, so it cannot be given tools",
                              metadata={"field": "tools"})  # fmt: skip
    try:
        tools = json.loads(tools_json)
    except ValueError as exc:
        raise InvalidArgument(f"tools_json is not JSON: {exc}", metadata={"field": "tools"}) from None
    if not isinstance(tools, list):
        raise InvalidArgument("tools_json must be a JSON list of tools", metadata={"field": "tools"})
    return tools


def encode(spec: PromptSpec, tokenizer, default: PromptFormat) -> EncodedPrompt:
    if spec.token_ids:
        ids = list(spec.token_ids)
        if max(ids) >= len(tokenizer):
            raise InvalidArgument(
                f"prompt token_ids must be < the vocabulary size {len(tokenizer)}, got {max(ids)}",
                metadata={"field": "prompt"},
            )
        text = tokenizer.decode(ids)
    else:
        text, add_special = render(spec, tokenizer, default)
        if spec.add_special_tokens is not None:
            add_special = spec.add_special_tokens
        ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    truncated = 0
    if spec.truncate_left_tokens is not None and len(ids) > spec.truncate_left_tokens:
        # The reference keeps the last 100 prompt tokens; here the number is the caller's choice.
        truncated = len(ids) - spec.truncate_left_tokens
        ids = ids[truncated:]
    return EncodedPrompt(text, tuple(ids), truncated)


def decode(
    token_ids: tuple[int, ...], tokenizer, vocab_size: int, *, skip_special_tokens: bool = True
) -> str:
    """Text of `token_ids` (vLLM's /detokenize), each checked against the model's vocabulary."""
    if len(token_ids) > MAX_PROMPT_TOKEN_IDS:
        raise InvalidArgument(
            f"token_ids may hold at most {MAX_PROMPT_TOKEN_IDS} ids, got {len(token_ids)}",
            metadata={"field": "token_ids"},
        )
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidArgument(
            f"token_ids must be in [0, {vocab_size}), got {bad[:8]}", metadata={"field": "token_ids"}
        )
    return tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
