"""Scoring candidate responses: the RRHF policy score p_i, and reward models.

Policy scores batch every response of every query in one padded forward pass (rows from different
callers share it), with log-softmax taken row by row so memory stays at one row's [L, V].

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
import torch.nn.functional as F

from wombat_core.errors import FailedPrecondition, InvalidArgument
from wombat_core.rrhf.collate import IGNORE_INDEX, CollationConfig, collate_group, pad_token_id
from wombat_core.rrhf.data import MAX_RESPONSES, MAX_TEXT_CHARS
from wombat_core.rrhf.loss import response_scores

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


@torch.inference_mode()
def policy_scores(
    model: torch.nn.Module, tokenizer, items: list[ScoreItem], model_max_length: int = 512
) -> list[list[float]]:
    groups = [
        collate_group(tokenizer, item.query, item.responses, (0.0,) * len(item.responses),
                      CollationConfig(model_max_length, alpaca_prompt=item.alpaca_prompt), where=f"item {n + 1}")
        for n, item in enumerate(items)
    ]  # fmt: skip
    length = max(g.input_ids.shape[1] for g in groups)
    pad = pad_token_id(tokenizer)
    input_ids = torch.cat([F.pad(g.input_ids, (0, length - g.input_ids.shape[1]), value=pad) for g in groups])
    mask = torch.cat([F.pad(g.attention_mask, (0, length - g.attention_mask.shape[1])) for g in groups])
    labels = torch.cat([F.pad(g.labels, (0, length - g.labels.shape[1]), value=IGNORE_INDEX) for g in groups])
    device = next(model.parameters()).device
    labelled = labels != IGNORE_INDEX
    # Only positions that predict a response token need the LM head and a log-softmax: skip the query.
    first = int(labelled.any(0).to(torch.int8).argmax())
    keep = torch.arange(first, length, device=device)
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep).logits
    labels, labelled = labels[:, first:].to(device), labelled[:, first:].to(device)
    logp = torch.zeros(labels.shape, dtype=torch.float32, device=device)
    for row in range(logits.shape[0]):
        positions = labelled[row].nonzero()[:, 0]
        row_logp = torch.log_softmax(logits[row, positions].float(), -1)
        logp[row, positions] = row_logp.gather(-1, labels[row, positions][:, None])[:, 0]
    results, row = [], 0
    for item in items:  # each caller's own length penalty on its own rows
        rows = slice(row, row + len(item.responses))
        results.append(response_scores(logp[rows], labels[rows], item.length_penalty).tolist())
        row = rows.stop
    return results


class RewardModel:
    def __init__(self, model: torch.nn.Module, tokenizer, value_head: torch.nn.Linear | None):
        self.model, self.tokenizer, self.value_head = model, tokenizer, value_head

    @classmethod
    def load(cls, directory: Path) -> RewardModel:
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

        from wombat_core.tokenizer import load_tokenizer

        directory = Path(directory)
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        tokenizer = load_tokenizer(directory, padding_side="right")
        if any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
            model = AutoModelForSequenceClassification.from_pretrained(
                str(directory), local_files_only=True
            ).eval()
            return cls(model, tokenizer, None)
        if not (directory / VALUE_HEAD_FILE).is_file():
            raise FailedPrecondition(
                f"{directory.name} is not a reward model: expected a *ForSequenceClassification config or "
                f"{VALUE_HEAD_FILE} with v_head.weight beside a causal-LM body"
            )
        body = AutoModel.from_pretrained(str(directory), local_files_only=True).eval()
        weight = load_file(directory / VALUE_HEAD_FILE)["v_head.weight"]
        head = torch.nn.Linear(weight.shape[1], 1, bias=False)
        with torch.no_grad():
            head.weight.copy_(weight)
        return cls(body, tokenizer, head.eval())

    @torch.inference_mode()
    def score(self, texts: list[str]) -> list[float]:
        eos = self.tokenizer.eos_token_id
        rewards = []
        for text in texts:
            ids = list(self.tokenizer(text)["input_ids"]) + [eos]
            ids = ids[-REWARD_MAX_TOKENS:]  # left truncation keeps the end of the response
            tensor = torch.tensor([ids])
            if self.value_head is None:
                rewards.append(float(self.model(input_ids=tensor).logits[0, 0]))
                continue
            hidden = self.model(input_ids=tensor).last_hidden_state[0]
            # The first EOS after position 0 (with LLaMA's bos = </s>, position 0 is also an EOS id).
            first_eos = next(i for i, t in enumerate(ids) if t == eos and i > 0)
            rewards.append(float(self.value_head(hidden[first_eos])[0]))
        return rewards
