"""Scoring candidate responses: the RRHF policy score p_i, and reward models.

Policy scores pack every query once with its responses (a block attention mask, positions restarting after
the query) and items from different callers into one unpadded row, and take the LM head and an fp32
log-softmax only where a response token is predicted, in bounded chunks.

Reward models (REFERENCE.md §3) come in two layouts:
  * a Hugging Face `*ForSequenceClassification` checkpoint: the score is its logit at the last token;
  * a causal-LM body plus `value_head.safetensors` holding `v_head.weight` [1, hidden] (linear, no bias):
    the reward is the value at the first EOS after the text (EOS appended; left truncation to 1024 tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from wombat_core.errors import FailedPrecondition, InvalidArgument
from wombat_core.rrhf.collate import IGNORE_INDEX, CollationConfig, collate_group, pad_token_id
from wombat_core.rrhf.data import MAX_RESPONSES, MAX_TEXT_CHARS
from wombat_core.rrhf.loss import length_normalised

VALUE_HEAD_FILE = "value_head.safetensors"
REWARD_MAX_TOKENS = 1024


@dataclass(frozen=True)
class ScoreItem:
    """One query with its candidate responses, validated once here (the RPC layer does not re-check)."""

    query: str
    responses: tuple[str, ...]
    length_penalty: float = 1.0
    alpaca_prompt: bool = False

    def __post_init__(self) -> None:
        if not self.query.strip():
            raise InvalidArgument("query is empty", metadata={"field": "query"})
        if not self.responses:
            raise InvalidArgument(
                "responses is empty; send at least one candidate", metadata={"field": "responses"}
            )
        if len(self.responses) > MAX_RESPONSES:
            raise InvalidArgument(
                f"responses may hold at most {MAX_RESPONSES} candidates, got {len(self.responses)}"
            )
        if any(not r.strip() for r in self.responses):
            raise InvalidArgument("every response must be non-empty", metadata={"field": "responses"})
        if len(self.query) + sum(len(r) for r in self.responses) > MAX_TEXT_CHARS * 4:
            raise InvalidArgument(
                f"query and responses may hold at most {MAX_TEXT_CHARS * 4} characters in all"
            )
        if not (math.isfinite(self.length_penalty) and 0 <= self.length_penalty <= 10):
            raise InvalidArgument(f"length_penalty must be in [0, 10], got {self.length_penalty}")


@dataclass(frozen=True)
class PackedItems:
    """Items packed into one row: each query once, then its k responses, each attending to its own query
    and to itself (a block mask), with positions restarting after the query for every response, so each
    response sees exactly the sequence query + response it would see alone, without padding."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    mask: torch.Tensor  # [1, 1, T, T] bool, True where attention is allowed
    predict_at: torch.Tensor  # [N] positions whose logits predict a response token
    targets: torch.Tensor  # [N] the token each predicts
    response_of: torch.Tensor  # [N] the response (0..R-1, over all items) each target belongs to
    responses: int  # R


def pack_items(groups: list) -> PackedItems:
    """Packs collated groups (wombat_core.rrhf.collate, so the tokens and truncation are training's)."""
    ids, positions, segments, items, is_query = [], [], [], [], []
    predict_at, targets, response_of = [], [], []
    segment = response = 0
    for item, group in enumerate(groups):
        labelled = group.labels[0] != IGNORE_INDEX
        query_length = int(labelled.to(torch.int8).argmax()) + 1  # labels start at the query's last token
        query_end = len(ids) + query_length
        blocks = [group.input_ids[0, :query_length].tolist()]
        blocks += [group.input_ids[row, query_length : int(group.attention_mask[row].sum())].tolist()
                   for row in range(group.input_ids.shape[0])]  # fmt: skip
        for number, block in enumerate(blocks):
            start, first_position = len(ids), 0 if number == 0 else query_length
            if number:
                # Token j of a response is predicted at the position before it: the query's last for j = 0.
                predict_at += [query_end - 1, *range(start, start + len(block) - 1)]
                targets += block
                response_of += [response] * len(block)
                response += 1
            ids += block
            positions += range(first_position, first_position + len(block))
            segments += [segment] * len(block)
            items += [item] * len(block)
            is_query += [number == 0] * len(block)
            segment += 1
    segment_of, item_of, query = torch.tensor(segments), torch.tensor(items), torch.tensor(is_query)
    t = torch.arange(len(ids))
    causal = t[:, None] >= t[None, :]
    visible = (segment_of[:, None] == segment_of[None, :]) | (
        query[None, :] & (item_of[:, None] == item_of[None, :])
    )
    return PackedItems(torch.tensor([ids]), torch.tensor([positions]), (causal & visible)[None, None],
                       torch.tensor(predict_at), torch.tensor(targets), torch.tensor(response_of), response)  # fmt: skip


@torch.inference_mode()
def policy_scores(model: torch.nn.Module, tokenizer, items: list[ScoreItem], model_max_length: int = 512,
                  max_tokens_per_forward: int = 4096) -> list[list[float]]:  # fmt: skip
    """p_i of every response of every item. Items are packed (`pack_items`) into rows of at most
    `max_tokens_per_forward` tokens; the LM head and a vectorised fp32 log-softmax run only at the
    positions that predict a response token."""
    groups = [
        collate_group(tokenizer, item.query, item.responses, (0.0,) * len(item.responses),
                      CollationConfig(model_max_length, alpaca_prompt=item.alpaca_prompt), where=f"item {n + 1}")
        for n, item in enumerate(items)
    ]  # fmt: skip
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    sums, counts = [], []
    for chunk in _chunks(groups, max_tokens_per_forward):
        packed = pack_items(chunk)
        hidden = model.get_decoder()(input_ids=packed.input_ids.to(device), attention_mask=packed.mask.to(device),
                                     position_ids=packed.position_ids.to(device)).last_hidden_state[0]  # fmt: skip
        logp = torch.empty(len(packed.targets), dtype=torch.float32, device=device)
        targets, at = packed.targets.to(device), packed.predict_at.to(device)
        for start in range(0, len(targets), 1024):  # bounds the [positions, vocabulary] logits
            rows = slice(start, start + 1024)
            logits = head(hidden[at[rows]]).float()
            logp[rows] = logits.log_softmax(-1).gather(-1, targets[rows, None])[:, 0]
        owner = packed.response_of.to(device)
        sums.append(torch.zeros(packed.responses, device=device).index_add_(0, owner, logp))
        counts.append(torch.bincount(owner, minlength=packed.responses))
    total, lengths = torch.cat(sums).cpu(), torch.cat(counts).cpu()
    results, row = [], 0
    for item in items:  # each caller's own length penalty on its own rows
        rows = slice(row, row + len(item.responses))
        results.append(length_normalised(total[rows], lengths[rows], item.length_penalty).tolist())
        row = rows.stop
    return results


def _chunks(groups: list, budget: int) -> list[list]:
    """Consecutive groups whose packed lengths fit `budget` tokens (a longer one goes alone)."""
    chunks, current, used = [], [], 0
    for group in groups:
        size = int(group.attention_mask.sum())  # an upper bound: the query is counted once per response
        if current and used + size > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(group)
        used += size
    return chunks + ([current] if current else [])


class RewardModel:
    def __init__(self, model: torch.nn.Module, tokenizer, value_head: torch.nn.Linear | None):
        self.model, self.tokenizer, self.value_head = model, tokenizer, value_head

    @classmethod
    def load(
        cls, directory: Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> RewardModel:
        from safetensors.torch import load_file
        from transformers import AutoConfig

        from wombat_core.rrhf.loading import load_rrhf_model

        directory = Path(directory)
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        if any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
            model, tokenizer = load_rrhf_model(
                directory, dtype=dtype, device=device, architecture="sequence_classification"
            )
            return cls(model.eval(), tokenizer, None)
        if not (directory / VALUE_HEAD_FILE).is_file():
            raise FailedPrecondition(
                f"{directory.name} is not a reward model: expected a *ForSequenceClassification config or "
                f"{VALUE_HEAD_FILE} with v_head.weight beside a causal-LM body"
            )
        body, tokenizer = load_rrhf_model(directory, dtype=dtype, device=device, architecture="base")
        weight = load_file(directory / VALUE_HEAD_FILE)["v_head.weight"]
        head = torch.nn.Linear(weight.shape[1], 1, bias=False)
        with torch.no_grad():
            head.weight.copy_(weight)
        return cls(body.eval(), tokenizer, head.to(device, dtype).eval())

    @torch.inference_mode()
    def score(self, texts: list[str], batch_size: int = 24) -> list[float]:
        """Rewards of `texts`, `batch_size` texts a forward (the reference's 24), right-padded."""
        rewards: list[float] = []
        for start in range(0, len(texts), batch_size):
            rewards += self._score_batch(texts[start : start + batch_size])
        return rewards

    def _score_batch(self, texts: list[str]) -> list[float]:
        eos = self.tokenizer.eos_token_id
        rows = [(list(self.tokenizer(text)["input_ids"]) + [eos])[-REWARD_MAX_TOKENS:] for text in texts]
        length = max(len(r) for r in rows)
        device = next(self.model.parameters()).device
        ids = torch.full((len(rows), length), pad_token_id(self.tokenizer), dtype=torch.long)
        real = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)], real[i, : len(r)] = torch.tensor(r), True
        ids, real = ids.to(device), real.to(device)
        index = torch.arange(len(rows), device=device)
        if self.value_head is None:
            hidden = self.model.base_model(input_ids=ids, attention_mask=real.long()).last_hidden_state
            last = real.sum(1) - 1  # the classifier's logit at the last real token
            return self.model.score(hidden[index, last])[:, 0].float().tolist()
        hidden = self.model(input_ids=ids, attention_mask=real.long()).last_hidden_state
        # The first EOS after position 0 (with LLaMA's bos = </s>, position 0 is also an EOS id).
        is_eos = (ids == eos) & real & (torch.arange(length, device=device) > 0)
        first_eos = is_eos.to(torch.int8).argmax(1)
        return self.value_head(hidden[index, first_eos])[:, 0].float().tolist()
