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

from wombat_core.engine.sampler import BatchSampler, SamplingRow, uniform
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
    SamplingParams(temperature=2.0, top_k=1),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.2),
    SamplingParams(temperature=0.5, repetition_penalty=0.8, min_new_tokens=4),  # < 1 favours repeats
    SamplingParams(temperature=0, min_new_tokens=4, stop_token_ids=(13, 17)),
    SamplingParams(temperature=1.0, top_p=0.5, min_new_tokens=2, stop_token_ids=(13,)),
]


def sampler_with(rows: list[SamplingParams], seeds=None) -> BatchSampler:
    sampler = BatchSampler(len(rows), VOCAB, torch.device("cpu"))
    seeds = seeds or list(range(len(rows)))
    sampler.add_rows(
        0, [SamplingRow(params, seed, PROMPT, EOS) for params, seed in zip(rows, seeds, strict=True)]
    )
    return sampler


def force(sampler: BatchSampler, tokens: tuple[int, ...]) -> None:
    """Steps every row through `tokens` (a logit no filter removes), as if the rows had generated them."""
    for token in tokens:
        logits = torch.zeros(sampler.slots, VOCAB)
        logits[:, token] = 1e4
        assert sampler.sample(logits, slice(0, sampler.slots)).tokens.tolist() == [token] * sampler.slots


@pytest.mark.parametrize("generated", [(), (30, 7, 41)], ids=["first step", "after three tokens"])
def test_processed_scores_match_transformers_row_by_row(generated):
    torch.manual_seed(0)
    sampler = sampler_with(ROWS)
    force(sampler, generated)
    logits = torch.randn(len(ROWS), VOCAB) * 3
    ours = sampler.processed_scores(logits.clone(), slice(0, len(ROWS)))  # the whole mixed batch at once
    for row, params in enumerate(ROWS):
        ids = torch.tensor([[*PROMPT, *generated]])
        expected = hf_processors(params, len(PROMPT))(ids, logits[row : row + 1].clone())[0]
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(expected)), (
            f"row {row}: different tokens filtered"
        )
        finite = ~torch.isinf(expected)
        torch.testing.assert_close(
            ours[row][finite], expected[finite], rtol=1e-6, atol=1e-6, msg=f"row {row}"
        )
        if not params.greedy and (params.top_k or params.top_p < 1 or params.min_p):
            assert not finite.all(), f"row {row}: nothing was filtered, so the comparison would prove little"


def test_greedy_rows_pick_the_processed_argmax():
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB) * 3
    rows = [params for params in ROWS if params.greedy]
    assert len(rows) == 3
    tokens = sampler_with(rows).sample(logits.clone(), slice(0, len(rows))).tokens.tolist()
    for row, params in enumerate(rows):
        expected = hf_processors(params, len(PROMPT))(torch.tensor([PROMPT]), logits[row : row + 1].clone())[
            0
        ]
        assert tokens[row] == int(expected.argmax())


def test_draws_follow_the_processed_distribution():
    """4000 seeded draws from one row with top-k, top-p and min-p: nothing outside HF's support, and each
    token's frequency within five standard errors of HF's probability."""
    torch.manual_seed(2)
    vocab, draws = 16, 4000
    logits = torch.randn(1, vocab) * 1.5
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, seed=0)
    expected = hf_processors(params, len(PROMPT))(torch.tensor([PROMPT]), logits.clone())[0].softmax(-1)
    sampler = BatchSampler(1, vocab, torch.device("cpu"))
    sampler.add_rows(0, [SamplingRow(params, 0, PROMPT, EOS)])
    counts = torch.zeros(vocab)
    for _ in range(draws):  # each draw is the row's next step: a fresh uniform
        counts[sampler.sample(logits, slice(0, 1)).tokens[0]] += 1
    assert counts[expected == 0].sum() == 0
    for token in range(vocab):
        p = float(expected[token])
        if p > 0:
            assert abs(counts[token] / draws - p) <= 5 * math.sqrt(p * (1 - p) / draws) + 1e-3, token


def test_a_seeded_row_draws_the_same_tokens_whatever_its_neighbours():
    torch.manual_seed(3)
    steps = 20
    logits = torch.randn(steps, VOCAB)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=7)

    def run(rows: list[SamplingParams], seeds: list[int], row: int) -> list[int]:
        sampler = sampler_with(rows, seeds)
        batch = torch.randn(steps, len(rows), VOCAB)  # the neighbours see other logits every step
        batch[:, row] = logits
        return [sampler.sample(batch[step], slice(0, len(rows))).tokens[row].item() for step in range(steps)]

    alone = run([seeded], [7], 0)
    crowded = run([ROWS[2], ROWS[6], seeded, ROWS[4]], [1, 2, 7, 3], 2)
    other_seed = run([SamplingParams(temperature=1.0, top_p=0.95, seed=8)], [8], 0)
    assert alone == crowded and alone != other_seed


def test_uniform_draws_are_uniform_and_depend_on_seed_and_step_only():
    seeds = torch.arange(50_000, dtype=torch.int64) * 7919
    draws = uniform(seeds, torch.zeros_like(seeds))
    assert 0 <= float(draws.min()) and float(draws.max()) < 1
    histogram = torch.histc(draws.float(), bins=10, min=0, max=1) / len(draws)
    assert torch.allclose(histogram, torch.full((10,), 0.1), atol=0.01)
    assert torch.equal(
        uniform(seeds[:5], torch.ones(5, dtype=torch.int64)),
        uniform(seeds[:5], torch.ones(5, dtype=torch.int64)),
    )
    assert not torch.equal(
        uniform(seeds[:5], torch.zeros(5, dtype=torch.int64)),
        uniform(seeds[:5], torch.ones(5, dtype=torch.int64)),
    )


def openai_penalties_reference(logits: torch.Tensor, params: SamplingParams, prompt, output) -> torch.Tensor:
    """The per-row formula, written out one token at a time: vLLM's order (logit_bias on the raw logits,
    then repetition over prompt + output, then OpenAI's documented
    mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty over the output's counts)."""
    scores = logits.clone()
    for token, bias in params.logit_bias:
        scores[token] += bias
    if params.repetition_penalty != 1.0:
        for token in set(prompt) | set(output):
            value = scores[token]
            scores[token] = (
                value * params.repetition_penalty if value < 0 else value / params.repetition_penalty
            )
    for token in set(output):
        count = output.count(token)
        scores[token] -= count * params.frequency_penalty + params.presence_penalty
    return scores


PENALTY_ROWS = [  # mixed with rows that use none of it, in one batch
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, presence_penalty=1.5),
    SamplingParams(temperature=0.8, frequency_penalty=0.7),
    SamplingParams(temperature=0, presence_penalty=-0.5, frequency_penalty=-1.2),
    SamplingParams(temperature=0, logit_bias=((3, 100.0), (9, -100.0), (40, 2.5))),
    SamplingParams(
        temperature=0,
        repetition_penalty=1.3,
        presence_penalty=0.4,
        frequency_penalty=0.3,
        logit_bias=((7, -3.0),),
    ),  # fmt: skip
]


def test_presence_frequency_penalties_and_logit_bias_match_the_per_row_formula():
    torch.manual_seed(3)
    sampler = sampler_with(PENALTY_ROWS)
    generated = (30, 7, 41, 30, 30, 7)
    force(sampler, generated)
    logits = torch.randn(len(PENALTY_ROWS), VOCAB) * 3
    ours = sampler.processed_scores(logits.clone(), slice(0, len(PENALTY_ROWS)))
    for row, params in enumerate(PENALTY_ROWS):
        expected = openai_penalties_reference(logits[row], params, PROMPT, list(generated))
        if params.greedy:
            torch.testing.assert_close(ours[row], expected, rtol=1e-6, atol=1e-5, msg=f"row {row}")
        else:  # the warpers follow; the penalised scores divided by the temperature are what they see
            torch.testing.assert_close(ours[row], expected / params.temperature, rtol=1e-6, atol=1e-5)
        if params.penalises_output or params.logit_bias:
            assert not torch.equal(expected, logits[row]), (
                f"row {row}: nothing moved, the test would prove little"
            )


def test_logit_bias_forces_and_bans_tokens_and_penalties_follow_moved_rows():
    sampler = sampler_with(PENALTY_ROWS)
    logits = torch.randn(len(PENALTY_ROWS), VOCAB)
    assert sampler.sample(logits.clone(), slice(0, len(PENALTY_ROWS))).tokens[4] == 3  # +100 forces token 3
    # Row 1 (presence 1.5) moves to row 0 when row 0 leaves; its counts travel with it.
    sampler.move_rows([(0, 1)])
    assert sampler.counts is not None and sampler.counts[0].sum() == 1
    assert sampler.frequency[0] == 0 and sampler.presence[0] == 1.5


def test_a_new_row_does_not_inherit_its_slot_predecessors_counts_or_bias():
    sampler = sampler_with(PENALTY_ROWS)
    force(sampler, (30, 30))
    sampler.add_rows(4, [SamplingRow(SamplingParams(temperature=0), 0, PROMPT, EOS)])
    assert sampler.counts[4].sum() == 0 and sampler.bias[4].abs().sum() == 0
