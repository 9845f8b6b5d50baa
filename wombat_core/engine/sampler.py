"""Turns one row of logits into the next token, with each request's own random generator.

Order follows Hugging Face generate: repetition penalty and min-new-tokens EOS suppression on the raw
scores, then temperature, top-k, top-p and min-p. Every request samples from its own `torch.Generator`,
so a seeded request gives the same tokens whatever else is in the batch. Log-probabilities are reported
under the model's own distribution (before penalties, temperature and filtering).
"""

from __future__ import annotations

import torch

from wombat_core.engine.sampling import SamplingParams
from wombat_core.engine.types import TokenLogprob, TopLogprob


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF semantics: divide positive scores of seen tokens by `penalty`, multiply negative ones."""
    picked = scores.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(-1, seen, picked)


def warp(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on a 1-D score vector; filtered entries become -inf."""
    scores = scores / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; the top token always stays.
        drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= params.top_p
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if params.min_p > 0.0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return scores


class RequestSampler:
    """Per-request sampling state: parameters, random generator, and the token ids seen so far."""

    def __init__(
        self, params: SamplingParams, prompt_token_ids: tuple[int, ...], eos_token_ids: tuple[int, ...]
    ):
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(
            params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        )
        self.seen = list(prompt_token_ids)
        self.generated = 0
        self._suppress = tuple(sorted(set(eos_token_ids) | set(params.stop_token_ids)))

    def processed_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The scores the next token is drawn from (argmax when greedy): `logits` (float32, this request's
        last position) after the repetition penalty, min-new-tokens suppression of EOS and stop tokens,
        temperature, top-k, top-p and min-p, in Hugging Face's order; filtered entries are -inf."""
        params = self.params
        scores = logits
        if params.repetition_penalty != 1.0 and self.seen:
            scores = apply_repetition_penalty(
                scores, torch.tensor(sorted(set(self.seen))), params.repetition_penalty
            )
        if self.generated < params.min_new_tokens and self._suppress:
            scores = scores.index_fill(-1, torch.tensor(self._suppress), float("-inf"))
        return scores if params.greedy else warp(scores, params)

    def next_token(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """`logits` is the float32 score vector of this request's last position."""
        params = self.params
        scores = self.processed_scores(logits)
        if params.greedy:
            token = int(torch.argmax(scores))
        else:
            token = int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))
        self.seen.append(token)
        self.generated += 1
        return token, (self._logprob(logits, token) if params.logprobs else None)

    def _logprob(self, logits: torch.Tensor, token: int) -> TokenLogprob:
        logprobs = torch.log_softmax(logits, -1)
        top: tuple[TopLogprob, ...] = ()
        if self.params.top_logprobs:
            values, ids = torch.topk(logprobs, self.params.top_logprobs)
            top = tuple(TopLogprob(int(i), "", float(v)) for v, i in zip(values, ids, strict=True))
        return TokenLogprob(token, float(logprobs[token]), top)
