"""The OpenAI request bodies the gateway accepts, as pydantic models with OpenAI's field names.

Besides OpenAI's fields, the sampling extensions vLLM accepts are taken too (`top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`; the openai SDK sends them with
`extra_body`). Unknown fields are ignored, as vLLM and OpenAI do. Fields OpenAI defines that this server
cannot honour (n > 1, best_of, echo, suffix, logit_bias, presence/frequency penalties, tools, JSON
mode) are refused with 400 naming the field, never silently dropped.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's own default for /v1/completions. Chat has no OpenAI default (it runs to the context's end);
# the gateway's --default-max-tokens applies there.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What both endpoints share. Defaults None mean "the server's default", which equals OpenAI's."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's sampling extensions.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, what to do) for a field set to something this server cannot do, else None."""
        if self.n != 1:
            return "n", "only n=1 is supported; send several requests for several completions"
        if self.presence_penalty or self.frequency_penalty:
            field = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            return field, f"{field} is not supported; use repetition_penalty (1.0 disables, >1 penalises)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None


class CompletionRequest(_Sampling):
    # A string, or one prompt as a list of token ids (a list of one string or one id list also works).
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=COMPLETIONS_DEFAULT_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if isinstance(self.prompt, list) and len(self.prompt) != 1 and not _is_token_ids(self.prompt):
            return "prompt", "send one prompt per request (a string or a list of token ids)"
        if self.echo:
            return "echo", "echo is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "best_of is not supported"
        return super().unsupported()


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict] | None = None
    response_format: dict | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tool calling is not supported"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format", "only the text response format is supported"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()


def _is_token_ids(prompt: list) -> bool:
    return bool(prompt) and all(isinstance(item, int) for item in prompt)
