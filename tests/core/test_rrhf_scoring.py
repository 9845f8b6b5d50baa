"""Reward models (value head at the first EOS; sequence classification) and diverse beam search."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.engine_fixtures import save_reward_models, save_servable_tiny_model
from wombat_core.engine.loading import load_for_serving
from wombat_core.errors import FailedPrecondition
from wombat_core.rrhf.candidates import diverse_beam_search
from wombat_core.rrhf.scoring import RewardModel


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("reward")
    policy = save_servable_tiny_model(base / "policy")
    classifier, value = save_reward_models(base, policy)
    return policy, classifier, value


def test_value_head_reward_is_read_at_the_first_eos(models):
    from transformers import LlamaModel

    _, _, value_dir = models
    reward = RewardModel.load(value_dir)
    text = "Name three colours. Red, green and blue."
    body = LlamaModel.from_pretrained(value_dir).eval()
    head = load_file(value_dir / "value_head.safetensors")["v_head.weight"]
    ids = reward.tokenizer(text)["input_ids"] + [reward.tokenizer.eos_token_id]
    with torch.no_grad():
        hidden = body(torch.tensor([ids])).last_hidden_state[0]
    expected = float(hidden[len(ids) - 1] @ head[0])
    assert reward.score([text]) == pytest.approx([expected], abs=1e-5)


def test_sequence_classification_reward_model(models):
    from transformers import LlamaForSequenceClassification

    _, classifier_dir, _ = models
    reward = RewardModel.load(classifier_dir)
    texts = ["Good answer.", "Another, longer answer here."]
    classifier = LlamaForSequenceClassification.from_pretrained(classifier_dir).eval()
    expected = []
    for text in texts:
        ids = reward.tokenizer(text)["input_ids"] + [reward.tokenizer.eos_token_id]
        with torch.no_grad():
            expected.append(float(classifier(torch.tensor([ids])).logits[0, 0]))
    assert reward.score(texts) == pytest.approx(expected, abs=1e-5)


def test_a_plain_causal_lm_is_not_a_reward_model(models):
    with pytest.raises(FailedPrecondition, match="value_head.safetensors"):
        RewardModel.load(models[0])


def test_diverse_beam_search_first_group_is_greedy_and_groups_differ(models):
    loaded = load_for_serving(models[0])
    prompt = loaded.tokenizer("Name three colours.")["input_ids"]
    candidates = diverse_beam_search(loaded.model, loaded.tokenizer, prompt, num_groups=4, max_new_tokens=12)
    greedy = loaded.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=2,
                                   pad_token_id=loaded.tokenizer.pad_token_id)[0, len(prompt):]  # fmt: skip
    assert candidates[0] == loaded.tokenizer.decode(greedy, skip_special_tokens=True).strip()
    assert len(candidates) == 4 and len(set(candidates)) > 1
    # The diversity penalty makes later groups avoid the first tokens chosen by earlier groups.
    no_penalty = diverse_beam_search(
        loaded.model, loaded.tokenizer, prompt, diversity_penalty=0.0, max_new_tokens=12
    )
    assert len(set(no_penalty)) == 1
