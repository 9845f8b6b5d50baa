"""The RRHF objective (REFERENCE.md §4), per query with k responses.

logp[i, t]  = log_softmax(logits)[i, t, labels[i, t]], 0 where the label is ignored
p_i         = sum_t logp[i, t] / len_i ** length_penalty              (len_i = labelled tokens)
L_rank      = sum over (i, j) with r_i < r_j and p_i > p_j of (p_i - p_j)
L_sft       = -mean_t logp[b, t] for b = argmax r   (the reference averages over the padded length,
              ignored positions counting as 0: `sft_padded_mean=True`; False averages over labelled tokens)
L           = rrhf_weight * L_rank + L_sft
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wombat_core.errors import InvalidArgument
from wombat_core.rrhf.collate import IGNORE_INDEX, CollatedGroup


@dataclass(frozen=True)
class LossConfig:
    rrhf_weight: float = 1.0
    length_penalty: float = 1.0
    sft_padded_mean: bool = True

    def __post_init__(self) -> None:
        if self.rrhf_weight < 0:
            raise InvalidArgument(f"rrhf_weight must be >= 0, got {self.rrhf_weight}")
        if not 0 <= self.length_penalty <= 10:
            raise InvalidArgument(f"length_penalty must be in [0, 10], got {self.length_penalty}")


@dataclass(frozen=True)
class LossParts:
    loss: torch.Tensor
    rank_loss: torch.Tensor
    sft_loss: torch.Tensor
    response_scores: torch.Tensor  # p_i, [k]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[k, L, V] logits and [k, L] labels -> [k, L] log-probabilities of the labels, 0 where ignored."""
    mask = labels != IGNORE_INDEX
    # Half-precision logits are upcast; float64 (used by the exactness tests) is kept as it is.
    logprobs = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    gathered = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return gathered * mask


def length_normalised(logp_sums: torch.Tensor, lengths: torch.Tensor, length_penalty: float) -> torch.Tensor:
    """p_i = sum_t logp / len_i ** length_penalty (a length of 0 counts as 1)."""
    return logp_sums / lengths.clamp(min=1).to(logp_sums.dtype) ** length_penalty


def response_scores(logp: torch.Tensor, labels: torch.Tensor, length_penalty: float) -> torch.Tensor:
    return length_normalised(logp.sum(-1), (labels != IGNORE_INDEX).sum(-1), length_penalty)


def rank_loss(p: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Sum of p_i - p_j over pairs where response j has the higher reward but the lower score."""
    diff = p.unsqueeze(0) - p.unsqueeze(-1)  # diff[i, j] = p_j - p_i
    reward_diff = rewards.unsqueeze(0) - rewards.unsqueeze(-1)  # r_j - r_i
    violated = (reward_diff > 0) & (diff < 0)
    return -diff[violated].sum()


def sft_loss(
    logp: torch.Tensor, labels: torch.Tensor, rewards: torch.Tensor, padded_mean: bool
) -> torch.Tensor:
    best = int(torch.argmax(rewards))
    if padded_mean:
        return -logp[best].mean()
    count = (labels[best] != IGNORE_INDEX).sum().clamp(min=1)
    return -logp[best].sum() / count


def rrhf_loss(logits: torch.Tensor, group: CollatedGroup, config: LossConfig) -> LossParts:
    logp = token_logprobs(logits, group.labels)
    p = response_scores(logp, group.labels, config.length_penalty)
    rewards = group.scores.to(p.device, p.dtype)
    ranking = rank_loss(p, rewards)
    sft = sft_loss(logp, group.labels, rewards, config.sft_padded_mean)
    return LossParts(config.rrhf_weight * ranking + sft, ranking, sft, p)


def compute_loss(model: torch.nn.Module, group: CollatedGroup, config: LossConfig) -> LossParts:
    """One forward pass over a query's k sequences and the RRHF loss."""
    device = next(model.parameters()).device
    logits = model(
        input_ids=group.input_ids.to(device), attention_mask=group.attention_mask.to(device)
    ).logits
    moved = CollatedGroup(
        group.input_ids, group.attention_mask, group.labels.to(device), group.scores.to(device)
    )
    return rrhf_loss(logits, moved, config)
