"""RRHF collation and loss against an independent, loop-by-loop implementation of REFERENCE.md §4."""

from __future__ import annotations

import math

import pytest
import torch

from tests.engine_fixtures import train_llama_like_spm
from tests.models import tiny_config
from wombat_core.errors import InvalidArgument
from wombat_core.rrhf.collate import IGNORE_INDEX, CollationConfig, collate_group
from wombat_core.rrhf.data import validate_records
from wombat_core.rrhf.loss import LossConfig, compute_loss
from wombat_core.tokenizer import PAD_TOKEN, add_wombat_special_tokens, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spm")
    train_llama_like_spm(directory)
    tok = load_tokenizer(directory)
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return (
        LlamaForCausalLM(tiny_config(vocab_size=len(tokenizer), max_position_embeddings=256)).double().eval()
    )


QUERY = "Name three colours."
RESPONSES = ("Red, green and blue.", "Blue.", "The quick brown fox jumps over the lazy dog 12.", "café 你好")
SCORES = (2.0, -1.0, 0.5, 1.0)


def reference_loss(model, tokenizer, query, responses, scores, *, length_penalty, rrhf_weight, padded_mean, bos_per_segment,
                   max_length=512):  # fmt: skip
    """REFERENCE §4 written out with Python loops over each sequence separately (no padding, no batching)."""
    q = tokenizer(query)["input_ids"]
    logps, lengths, padded_len = [], [], 0
    for response in responses:
        r = tokenizer(response + tokenizer.eos_token, add_special_tokens=bos_per_segment)["input_ids"][
            : max_length - len(q)
        ]
        sequence = q + r
        padded_len = max(padded_len, len(sequence))
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[0].double()
        logprobs = torch.log_softmax(logits, -1)
        # position t predicts token t + 1; only response tokens are scored
        token_lps = [float(logprobs[t, sequence[t + 1]]) for t in range(len(q) - 1, len(sequence) - 1)]
        logps.append(token_lps)
        lengths.append(len(token_lps))
    p = [sum(lp) / (n**length_penalty) for lp, n in zip(logps, lengths, strict=True)]
    rank = 0.0
    for i in range(len(p)):
        for j in range(len(p)):
            if scores[i] < scores[j] and p[i] > p[j]:
                rank += p[i] - p[j]
    best = max(range(len(scores)), key=lambda i: scores[i])
    sft = -sum(logps[best]) / (padded_len if padded_mean else lengths[best])
    return rrhf_weight * rank + sft, rank, sft, p


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
@pytest.mark.parametrize("padded_mean", [True, False])
@pytest.mark.parametrize("bos_per_segment", [True, False])
def test_loss_equals_the_reference_formulas(model, tokenizer, length_penalty, padded_mean, bos_per_segment):
    rrhf_weight = 0.7
    group = collate_group(
        tokenizer, QUERY, RESPONSES, SCORES, CollationConfig(bos_per_segment=bos_per_segment)
    )
    parts = compute_loss(model, group, LossConfig(rrhf_weight, length_penalty, padded_mean))
    expected, rank, sft, p = reference_loss(model, tokenizer, QUERY, RESPONSES, SCORES, length_penalty=length_penalty,
                                            rrhf_weight=rrhf_weight, padded_mean=padded_mean,
                                            bos_per_segment=bos_per_segment)  # fmt: skip
    assert rank > 0  # the random model ranks some pair against the rewards, so the rank term is exercised
    assert parts.response_scores.detach().tolist() == pytest.approx(p, abs=1e-6)
    assert float(parts.rank_loss.detach()) == pytest.approx(rank, abs=1e-6)
    assert float(parts.sft_loss.detach()) == pytest.approx(sft, abs=1e-6)
    assert float(parts.loss.detach()) == pytest.approx(expected, abs=1e-6)


def test_truncation_to_model_max_length(model, tokenizer):
    config = CollationConfig(model_max_length=24)
    group = collate_group(tokenizer, QUERY, RESPONSES, SCORES, config)
    assert group.input_ids.shape[1] <= 24
    parts = compute_loss(model, group, LossConfig())
    expected, *_ = reference_loss(model, tokenizer, QUERY, RESPONSES, SCORES, length_penalty=1.0, rrhf_weight=1.0,
                                  padded_mean=True, bos_per_segment=True, max_length=24)  # fmt: skip
    assert float(parts.loss.detach()) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(InvalidArgument, match="no room for a response"):
        collate_group(tokenizer, "word " * 40, RESPONSES, SCORES, config)


def test_collation_labels_for_a_sentencepiece_tokenizer(tokenizer):
    add_wombat_special_tokens(tokenizer)  # the reference's LLaMA conventions: eos = bos = unk = </s>
    group = collate_group(tokenizer, QUERY, ("Blue.",), (1.0,), CollationConfig())
    ids, labels, mask = (
        group.input_ids[0].tolist(),
        group.labels[0].tolist(),
        group.attention_mask[0].tolist(),
    )
    query_ids = tokenizer(QUERY)["input_ids"]
    response_ids = tokenizer("Blue.</s>")["input_ids"]
    assert ids == query_ids + response_ids and all(mask)
    assert response_ids[-1] == tokenizer.eos_token_id == 2  # the appended EOS is the </s> token, not text
    # With bos = </s> (the reference's setting), each piece starts with </s>: the query and the response.
    assert query_ids[0] == response_ids[0] == tokenizer.bos_token_id == 2
    # Query positions are ignored except the last, which predicts the first response token.
    assert labels[: len(query_ids) - 1] == [IGNORE_INDEX] * (len(query_ids) - 1)
    assert labels[len(query_ids) - 1 : -1] == response_ids and labels[-1] == IGNORE_INDEX
    for t, label in enumerate(labels):
        if label != IGNORE_INDEX:
            assert label == ids[t + 1]


def test_padding_rows_are_ignored(tokenizer):
    group = collate_group(
        tokenizer, QUERY, ("Blue.", "A much longer answer about colours."), (0.0, 1.0), CollationConfig()
    )
    short = group.labels[0]
    padding = group.attention_mask[0] == 0
    assert padding.any() and (short[padding] == IGNORE_INDEX).all()
    assert (group.input_ids[0][padding] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"query": "q", "responses": ["a", "b"], "scores": [1.0]},
            "scores must be a list as long as responses (2), got 1",
        ),
        ({"query": "q", "responses": ["a", ""], "scores": [1, 2]}, "responses[1] must be a non-empty string"),
        ({"query": "q", "responses": ["a"], "scores": [math.inf]}, "scores[0] must be a finite number"),
        ({"query": "q", "responses": ["a"], "scores": [float("nan")]}, "scores[0] must be a finite number"),
        ({"query": "", "responses": ["a"], "scores": [1]}, "query must be a non-empty string"),
        ({"query": "q", "responses": [], "scores": []}, "responses must be a non-empty list"),
        (["not", "an", "object"], "record must be a JSON object"),
    ],
)
def test_bad_records_name_the_record_and_field(raw, message):
    with pytest.raises(InvalidArgument) as info:
        validate_records([{"query": "fine", "responses": ["x"], "scores": [1]}, raw])
    assert info.value.message == f"record 2: {message}" or info.value.message.startswith(
        f"record 2: {message}"
    )
