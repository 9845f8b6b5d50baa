"""The OpenAI request bodies the gateway accepts, as pydantic models with OpenAI's field names.

Besides OpenAI's fields, the sampling extensions vLLM accepts are taken too (`top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `prompt_logprobs`,
`truncate_prompt_tokens`; the openai SDK sends them with `extra_body`). `response_format` (json_object,
json_schema) and chat `tools` with tool_choice "required" or a named function are structured output.
Unknown fields are ignored, as vLLM and OpenAI do, except the fields of OpenAI and vLLM that this server
knows and cannot honour: those are refused with 400 naming the field unless they hold their neutral value (`UNSUPPORTED`), never
silently dropped. Every optional field accepts an explicit `null`, as OpenAI does, meaning its default.

Integers travel in int32 protobuf fields, so each is bounded here (400 naming the field) rather than
overflowing in the conversion.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# OpenAI's own default for /v1/completions. Chat has no OpenAI default (it runs to the context's end);
# the gateway's --default-max-tokens applies there.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
INT32_MAX = 2**31 - 1
MAX_N = 128  # OpenAI's bound on n
MAX_LOGPROBS = 20
MAX_BATCH_PROMPTS = 1024  # prompts in one /v1/completions request

Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


# vLLM and OpenAI fields this server does not implement: (neutral value(s), what to do instead). A request
# holding any other value gets 400 naming the field.
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "best_of": ((None, 1), "best_of is not supported; use n and rank the choices yourself"),
    "functions": ((None, []), "legacy functions are not supported; send tools instead"),
    "function_call": (
        (None, "none"),
        "legacy function_call is not supported; send tools and tool_choice instead",
    ),
    "include_stop_str_in_output": ((None, False), "include_stop_str_in_output is not supported"),
    "use_beam_search": ((None, False), "beam search is not supported"),
    "length_penalty": ((None, 1, 1.0), "length_penalty (beam search) is not supported"),
    "allowed_token_ids": ((None, []), "allowed_token_ids is not supported; use logit_bias"),
    "bad_words": ((None, []), "bad_words is not supported; use logit_bias with -100"),
    "guided_json": ((None,), "guided_json is not supported; use response_format"),
    "guided_regex": ((None,), "guided_regex is not supported"),
    "guided_choice": ((None,), "guided_choice is not supported"),
    "guided_grammar": ((None,), "guided_grammar is not supported"),
    "structured_outputs": ((None,), "structured_outputs is not supported; use response_format"),
    "skip_special_tokens": ((None, True), "skip_special_tokens: false is not supported"),
    "spaces_between_special_tokens": ((None, True), "spaces_between_special_tokens: false is not supported"),
    "return_tokens_as_token_ids": ((None, False), "return_tokens_as_token_ids is not supported"),
    "prompt_embeds": ((None,), "prompt_embeds is not supported"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only the text modality is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "chat_template": ((None,), "a per-request chat_template is not supported"),
    "continue_final_message": ((None, False), "continue_final_message is not supported"),
    "add_generation_prompt": ((None, True), "add_generation_prompt: false is not supported"),
    "documents": ((None, []), "documents are not supported"),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = None


class _Sampling(BaseModel):
    """What both endpoints share. None (absent or null) means "the server's default", which is OpenAI's."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's sampling extensions.
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)  # -1 or 0 disables, as in vLLM
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    min_tokens: Count | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    add_special_tokens: bool | None = None  # vLLM's: whether the tokenizer adds BOS and the like
    response_format: dict | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_as_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit() or int(key) > INT32_MAX:
                raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"values must be in [-100, 100], got {bias} for token {key}")
        return value

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> tuple[str, str] | None:
        """(field, what to do) for a field set to something this server cannot do, else None."""
        extras = self.model_extra or {}
        for name, (neutral, advice) in UNSUPPORTED.items():
            if name in extras and extras[name] not in neutral:
                return name, advice
        if self.response_format is not None:
            kind = self.response_format.get("type")
            if kind not in ("text", "json_object", "json_schema"):
                return (
                    "response_format",
                    f"response_format type must be text, json_object or json_schema, got {kind!r}",
                )
            if kind == "json_schema" and not isinstance(
                (self.response_format.get("json_schema") or {}).get("schema"), dict
            ):
                return (
                    "response_format",
                    "response_format json_schema needs json_schema.schema, a JSON Schema object",
                )
        if self.stream_options is not None and not self.streaming:
            return "stream_options", "stream_options needs stream: true"
        return None


class CompletionRequest(_Sampling):
    # A string, a list of strings, a list of token ids, or a list of token-id lists (a batch of prompts).
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: Count | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def prompts(self) -> list[str | list[int]]:
        """The batch: each prompt a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        return list(prompt)

    @property
    def new_tokens(self) -> int:
        return COMPLETIONS_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        prompts = self.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            return "prompt", "prompt must not be empty"
        if len(prompts) > MAX_BATCH_PROMPTS:
            return "prompt", f"send at most {MAX_BATCH_PROMPTS} prompts in one request, got {len(prompts)}"
        if self.new_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens: 0 generates nothing; it is only for echo (scoring the prompt)"
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
    max_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    echo: bool | None = None  # vLLM's chat extra

    def unsupported(self) -> tuple[str, str] | None:
        for tool in self.tools or []:
            function = tool.get("function") if isinstance(tool, dict) else None
            if tool.get("type") != "function" or not isinstance(function, dict) or not function.get("name"):
                return (
                    "tools",
                    'each tool must be {"type": "function", "function": {"name": ..., "parameters": {...}}}',
                )
            if not isinstance(function.get("parameters", {}), dict):
                return "tools", f"tool {function['name']!r}: parameters must be a JSON Schema object"
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not self.tools:
            return "tool_choice", "tool_choice names a tool, but the request has no tools"
        if isinstance(choice, dict) and self.named_tool() is None:
            return (
                "tool_choice",
                'tool_choice must be {"type": "function", "function": {"name": <one of the tools>}}',
            )
        if isinstance(choice, str) and choice not in ("none", "auto", "required"):
            return (
                "tool_choice",
                f'tool_choice must be "none", "auto", "required" or a named function, got {choice!r}',
            )
        if (
            self.tools
            and choice != "none"
            and self.response_format
            and self.response_format.get("type") != "text"
        ):
            return "response_format", "response_format and a tool choice both constrain the output: send one"
        if self.echo:
            return "echo", "echo is only supported on /v1/completions"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()

    def named_tool(self) -> dict | None:
        """The function tool_choice names, when it names one of the tools."""
        choice = self.tool_choice
        if not isinstance(choice, dict) or choice.get("type") != "function":
            return None
        name = (choice.get("function") or {}).get("name")
        return next((t["function"] for t in self.tools or [] if t["function"]["name"] == name), None)

    @property
    def calls_tools(self) -> bool:
        """The output is constrained to tool calls (tool_choice "required" or a named function)."""
        return bool(self.tools) and self.tool_choice not in (None, "none", "auto")

    @property
    def may_call_tools(self) -> bool:
        """tool_choice "auto" (OpenAI's default with tools): the model decides; its output is parsed."""
        return bool(self.tools) and self.tool_choice in (None, "auto")


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt (as /v1/completions takes it) or chat messages (as /v1/chat/completions)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    return_token_strs: bool | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[TokenId]
