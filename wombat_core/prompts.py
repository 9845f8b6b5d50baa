"""The exact Alpaca prompt template Wombat was trained and is served with (REFERENCE.md §2)."""

from __future__ import annotations

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
RESPONSE_MARKER = "### Response:"


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the template's own name
    """Renders the template. No trailing space after `### Response:`, exactly as the reference."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def alpaca_prompt_from_query(query: str) -> str:
    """The reference's data-pipeline variant: first line is the instruction, the remaining lines the input."""
    instruction, _, rest = query.partition("\n")
    return alpaca_prompt(instruction, rest)


def extract_response(generated_text: str, eos_token: str = "</s>") -> str:
    """The reference's post-processing: text after `### Response:`, cut at the first EOS, stripped."""
    _, marker, after = generated_text.partition(RESPONSE_MARKER)
    text = after if marker else generated_text
    return text.split(eos_token, 1)[0].strip()
