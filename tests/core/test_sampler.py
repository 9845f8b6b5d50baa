"""The sampler against the reference: transformers' own logits processors, row by row, on random logits
with different parameters in every row of one batch; and draws that follow the processed distribution."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from wombat_core.engine.sampler import RequestSampler
from wombat_core.engine.sampling import SamplingParams

VOCAB = 64
EOS = (2, 5)  # two EOS ids, as models with a list of them have
PROMPT = (7, 7, 9, 11, 3)


def hf_processors(params: SamplingParams, prompt_length: int) -> LogitsProcessorList:
    """The processors HF generate builds for these parameters, in its order (generation/utils.py)."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.min_new_tokens:
        eos = list(EOS) + list(params.stop_token_ids)
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, params.min_new_tokens, eos))
    if not params.greedy:
        processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        if params.min_p > 0.0:
            processors.append(MinPLogitsWarper(params.min_p))
    return processors


ROWS = [  # one batch, every row its own parameters
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, repetition_penalty=1.3),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.2),
    SamplingParams(temperature=0.5, repetition_penalty=0.8, min_new_tokens=4),  # < 1 favours repeats
    SamplingParams(temperature=0, min_new_tokens=4, stop_token_ids=(13, 17)),
    SamplingParams(temperature=1.0, top_p=0.5, min_new_tokens=2, stop_token_ids=(13,)),
]


@pytest.mark.parametrize("generated", [(), (13, 2, 30)], ids=["first step", "after three tokens"])
def test_processed_scores_match_transformers_row_by_row(generated):
    torch.manual_seed(0)
    logits = torch.randn(len(ROWS), VOCAB) * 3
    for row, params in enumerate(ROWS):
        sampler = RequestSampler(params, PROMPT, EOS)
        for token in generated:  # the state after those tokens: seen ids, generated count
            sampler.seen.append(token)
            sampler.generated += 1
        ours = sampler.processed_scores(logits[row].clone())
        ids = torch.tensor([[*PROMPT, *generated]])
        expected = hf_processors(params, len(PROMPT))(ids, logits[row : row + 1].clone())[0]
        assert torch.equal(torch.isinf(ours), torch.isinf(expected)), f"row {row}: different tokens filtered"
        finite = ~torch.isinf(expected)
        torch.testing.assert_close(ours[finite], expected[finite], rtol=1e-6, atol=1e-6, msg=f"row {row}")
        if not params.greedy and (params.top_k or params.top_p < 1 or params.min_p):
            assert not finite.all(), f"row {row}: nothing was filtered, so the comparison would prove little"


def test_greedy_rows_pick_the_processed_argmax():
    torch.manual_seed(1)
    logits = torch.randn(VOCAB) * 3
    for params in (ROWS[0], ROWS[1], ROWS[8]):
        sampler = RequestSampler(params, PROMPT, EOS)
        expected = hf_processors(params, len(PROMPT))(torch.tensor([PROMPT]), logits[None].clone())[
            0
        ].argmax()
        assert sampler.next_token(logits.clone())[0] == int(expected)


def test_draws_follow_the_processed_distribution():
    """4000 seeded draws from one row with top-k, top-p and min-p: nothing outside HF's support, and each
    token's frequency within five standard errors of HF's probability."""
    torch.manual_seed(2)
    logits = torch.randn(16) * 1.5
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, seed=0)
    expected = hf_processors(params, len(PROMPT))(torch.tensor([PROMPT]), logits[None].clone())[0].softmax(-1)
    draws = 4000
    counts = torch.zeros(16)
    sampler = RequestSampler(params, PROMPT, EOS)
    for _ in range(draws):
        token, _ = sampler.next_token(logits.clone())
        sampler.seen.pop()  # no repetition penalty here; keep the state fixed
        counts[token] += 1
    assert counts[expected == 0].sum() == 0
    for token in range(16):
        p = float(expected[token])
        if p > 0:
            assert abs(counts[token] / draws - p) <= 5 * math.sqrt(p * (1 - p) / draws) + 1e-3, token


def test_a_seed_gives_the_same_tokens_and_another_seed_others():
    torch.manual_seed(3)
    logits = torch.randn(20, VOCAB)

    def run(seed: int) -> list[int]:
        sampler = RequestSampler(SamplingParams(temperature=1.0, seed=seed), PROMPT, EOS)
        return [sampler.next_token(row.clone())[0] for row in logits]

    assert run(7) == run(7) and run(7) != run(8)
