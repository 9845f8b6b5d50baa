"""RRHF collation, as the reference data collator does it (REFERENCE.md §4).

For a query with k responses, sequence i = tokens(query) + tokens(response_i + eos_token). The reference
tokenises the two pieces in separate calls with the tokenizer's default special tokens, so with a
tokenizer that prepends BOS, *each piece* starts with BOS (`bos_per_segment=True`, the default);
`bos_per_segment=False` tokenises the response without special tokens. The response is truncated so the
sequence fits `model_max_length`. Labels are -100 over the query and shifted left by one, so position t
holds the label of token t+1; the last position is -100.

Padding, the one policy of RRHF scoring and training alike: sequences are right-padded with the
tokenizer's pad token, or with EOS when it has none; the vocabulary is never grown. A pad position is
masked out of attention and ignored by the labels, and right padding comes after every real token, so
the pad id never reaches a logit that enters p_i: any id is correct. Adding a `[PAD]` token instead (as
the reference's train script does for a base without one) would add an LM-head row, and that row
would change the log-softmax normaliser, so the same model would get different p_i in Score and in
training, and the trained model would no longer have its base's shapes. Wombat's own starting point
(Alpaca) already has `[PAD]`, so for it both policies are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wombat_core.errors import InvalidArgument
from wombat_core.prompts import alpaca_prompt_from_query
from wombat_core.rrhf.data import PreferenceRecord

IGNORE_INDEX = -100


@dataclass(frozen=True)
class CollationConfig:
    model_max_length: int = 512
    bos_per_segment: bool = True
    alpaca_prompt: bool = False  # wrap the query in the Alpaca template (the reference's data pipeline)

    def __post_init__(self) -> None:
        if self.model_max_length < 2:
            raise InvalidArgument(f"model_max_length must be >= 2, got {self.model_max_length}")


@dataclass
class CollatedGroup:
    """One query's k sequences, right-padded."""

    input_ids: torch.Tensor  # [k, L]
    attention_mask: torch.Tensor  # [k, L]
    labels: torch.Tensor  # [k, L], IGNORE_INDEX where no loss
    scores: torch.Tensor  # [k] reward scores (float32)


def pad_token_id(tokenizer) -> int:
    """The id RRHF pads with: the tokenizer's pad token, else EOS (see the module docstring for why)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _ids(tokenizer, text: str, add_special_tokens: bool, max_length: int | None = None) -> list[int]:
    kwargs = {"truncation": True, "max_length": max_length} if max_length is not None else {}
    return list(tokenizer(text, add_special_tokens=add_special_tokens, **kwargs)["input_ids"])


def collate_group(
    tokenizer, query: str, responses: tuple[str, ...], scores: tuple[float, ...], config: CollationConfig,
    where: str = "record",
) -> CollatedGroup:  # fmt: skip
    text = alpaca_prompt_from_query(query) if config.alpaca_prompt else query
    query_ids = _ids(tokenizer, text, add_special_tokens=True)
    room = config.model_max_length - len(query_ids)
    if room < 1:
        raise InvalidArgument(
            f"{where}: the query is {len(query_ids)} tokens, leaving no room for a response within "
            f"model_max_length={config.model_max_length}",
            metadata={"where": where, "field": "query"},
        )
    sequences, labels = [], []
    for response in responses:
        response_ids = _ids(
            tokenizer, response + tokenizer.eos_token, config.bos_per_segment, max_length=room
        )
        sequences.append(query_ids + response_ids)
        labels.append([IGNORE_INDEX] * (len(query_ids) - 1) + response_ids + [IGNORE_INDEX])
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    label_tensor = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for row, (sequence, label) in enumerate(zip(sequences, labels, strict=True)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        label_tensor[row, : len(label)] = torch.tensor(label)
    return CollatedGroup(input_ids, attention_mask, label_tensor, torch.tensor(scores, dtype=torch.float32))


def collate_record(
    tokenizer, record: PreferenceRecord, config: CollationConfig, where: str = "record"
) -> CollatedGroup:
    return collate_group(tokenizer, record.query, record.responses, record.scores, config, where)
