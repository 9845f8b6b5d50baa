"""Reward models (value head at the first EOS; sequence classification) and diverse beam search."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from tests.engine_fixtures import save_reward_models, save_servable_tiny_model
from wombat_core.engine.loading import load_for_serving
from wombat_core.errors import FailedPrecondition, Unavailable
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


def test_score_and_training_compute_the_same_p_i_for_a_model_without_a_pad_token(tmp_path):
    """The one pad policy (wombat_core.rrhf.collate): EOS pads when the tokenizer has no pad token, and the
    vocabulary is never grown. p_i from the Score path (the scorer actor's loader and `policy_scores`) equals
    p_i from the training path (the training worker's loader, collation and loss)."""
    from wombat_core.rrhf.collate import collate_record
    from wombat_core.rrhf.data import PreferenceRecord
    from wombat_core.rrhf.loading import load_rrhf_model
    from wombat_core.rrhf.loss import compute_loss
    from wombat_core.rrhf.scoring import ScoreItem, policy_scores
    from wombat_core.rrhf.training import TrainingConfig, load_for_training

    directory = save_servable_tiny_model(tmp_path / "no-pad", pad_token=False)
    responses = ("Red, green and blue.", "Blue.", "The quick brown fox jumps over the lazy dog.")
    scorer, scorer_tokenizer = load_rrhf_model(directory)  # as ScorerActor loads it on CPU
    assert scorer_tokenizer.pad_token is None
    scored = policy_scores(scorer.eval(), scorer_tokenizer, [ScoreItem("Name three colours.", responses)])[0]

    model, tokenizer = load_for_training(directory)  # as run_training loads it
    config = TrainingConfig()
    group = collate_record(
        tokenizer, PreferenceRecord("Name three colours.", responses, (2.0, 0.0, 1.0)), config.collation
    )
    with torch.no_grad():
        trained = compute_loss(model.eval(), group, config.loss).response_scores.tolist()

    assert trained == pytest.approx(scored, abs=1e-5)
    shortest = int(group.attention_mask.sum(1).argmin())
    assert group.input_ids[shortest, -1] == tokenizer.eos_token_id and group.attention_mask[shortest, -1] == 0
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)  # no [PAD] row was added


def test_a_failed_candidate_fails_the_job_instead_of_an_empty_answer(models):
    """An engine failure while sampling candidates is raised, never written as an empty candidate."""
    from types import SimpleNamespace

    from wombat_core.rrhf.candidates import CandidateMethod, CandidatesConfig, generate_candidates

    loaded = load_for_serving(models[0])

    class BreaksOnDecode(torch.nn.Module):
        """The policy, except that every decode step fails (a lost device, say)."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.config, self.generation_config = inner, inner.config, inner.generation_config

        def forward(self, input_ids, cache=None, **inputs):
            if input_ids.shape[1] == 1:
                raise RuntimeError("CUDA error: device lost")
            return self.inner(input_ids=input_ids, cache=cache, **inputs)

    policy = SimpleNamespace(model=BreaksOnDecode(loaded.model), tokenizer=loaded.tokenizer,
                             context_length=loaded.context_length)  # fmt: skip
    reward = SimpleNamespace(score=lambda texts: [0.0] * len(texts))
    config = CandidatesConfig(
        ("Name a colour.",), num_candidates=2, max_new_tokens=4, method=CandidateMethod.SAMPLING
    )
    with pytest.raises(Unavailable, match="device lost") as failure:  # the engine died of it
        generate_candidates(policy, reward, config)
    assert isinstance(failure.value.__cause__, RuntimeError)
    working = SimpleNamespace(
        model=loaded.model, tokenizer=loaded.tokenizer, context_length=loaded.context_length
    )
    (record,) = generate_candidates(working, reward, config)
    assert len(record.responses) == 2 and all(record.responses)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"queries": ()}, "queries must hold 1 to 10000 entries, got 0"),
        ({"queries": ("ok", " ")}, "every query must be non-empty"),
        ({"num_candidates": 0}, "num_candidates must be in [1, 16], got 0"),
        ({"max_new_tokens": 4096}, "max_new_tokens must be in [1, 2048], got 4096"),
    ],
)
def test_candidates_config_says_what_is_wrong(fields, message):
    from wombat_core.errors import InvalidArgument
    from wombat_core.rrhf.candidates import CandidatesConfig

    with pytest.raises(InvalidArgument) as info:
        CandidatesConfig(**{"queries": ("q",), **fields})
    assert info.value.message == message


def test_sampled_candidates_that_stay_empty_fail_clearly(tmp_path):
    """A policy that only ever says a space, then stops: EOS is held back for the first token, the
    whitespace answer is drawn again, and after the last attempt the job fails saying why."""
    from tests.engine_fixtures import save_wired_model, text_tokens
    from wombat_core.engine import Engine, EngineConfig
    from wombat_core.rrhf.candidates import sample_candidates
    from wombat_core.tokenizer import load_tokenizer

    directory = tmp_path / "terse"
    (word,) = text_tokens(directory, "Red")[:1]
    space = load_tokenizer(directory).convert_tokens_to_ids("▁")
    loaded = load_for_serving(save_wired_model(directory, {word: {2: 20.0, space: 10.0}, space: {2: 20.0}}))
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=2, context_length=64))
    engine.start()
    try:
        with pytest.raises(FailedPrecondition, match="2 of 2 sampled candidates stayed empty after 5 draws"):
            sample_candidates(engine, [1, word], k=2, max_new_tokens=4, seed=0)
    finally:
        engine.stop()


def test_packed_scoring_equals_the_training_p_i_of_each_item(models):
    """Several items packed into one row (each query once, block mask, positions restarting after the
    query) give each response the p_i that training's padded forward and loss give it alone."""
    from wombat_core.rrhf.collate import collate_group
    from wombat_core.rrhf.loading import load_rrhf_model
    from wombat_core.rrhf.loss import compute_loss
    from wombat_core.rrhf.scoring import ScoreItem, pack_items, policy_scores
    from wombat_core.rrhf.training import TrainingConfig

    model, tokenizer = load_rrhf_model(models[0])
    items = [ScoreItem("Name three colours.", ("Red, green and blue.", "Blue.")),
             ScoreItem("What is 2 + 2? Answer briefly please.", ("4", "It is four.", "Five, obviously, or six."), 0.5),
             ScoreItem("Hi", ("Hello there, how are you today?",))]  # fmt: skip
    packed = policy_scores(model, tokenizer, items)
    config = TrainingConfig()
    for item, scores in zip(items, packed, strict=True):
        group = collate_group(
            tokenizer, item.query, item.responses, (0.0,) * len(item.responses), config.collation
        )
        loss = replace(config.loss, length_penalty=item.length_penalty)
        with torch.no_grad():
            expected = compute_loss(model.eval(), group, loss).response_scores.tolist()
        assert scores == pytest.approx(expected, abs=1e-5)
    groups = [
        collate_group(tokenizer, i.query, i.responses, (0.0,) * len(i.responses), config.collation)
        for i in items
    ]
    real_tokens = sum(int(g.attention_mask.sum()) for g in groups)
    assert pack_items(groups).input_ids.shape[1] < real_tokens  # each query once, no padding
    # A token budget smaller than the items splits them over forwards without changing a score.
    split = policy_scores(model, tokenizer, items, max_tokens_per_forward=8)
    assert [x for row in split for x in row] == pytest.approx([x for row in packed for x in row], abs=1e-6)


def test_reward_models_score_a_padded_batch_as_they_score_each_text_alone(models):
    _, classifier_dir, value_dir = models
    texts = [
        "Short.",
        "A much longer answer with many more tokens in it than the first.",
        "Medium answer here.",
    ]
    for directory in (classifier_dir, value_dir):
        reward = RewardModel.load(directory)
        alone = [reward.score([text])[0] for text in texts]
        assert reward.score(texts) == pytest.approx(alone, abs=1e-5)
        assert reward.score(texts, batch_size=2) == pytest.approx(alone, abs=1e-5)
