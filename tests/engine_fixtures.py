"""A tiny random LLaMA with a real sentencepiece tokenizer, saved as a servable model directory."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
import torch

from tests.models import tiny_config

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nName three colours.\n\n### Response:\nRed, green and blue.",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "Unicode: café, naïve, 你好世界, 🙂🚀 and ünïcödé.",
] * 50


def train_llama_like_spm(directory: Path, vocab_size: int = 400) -> Path:
    """A sentencepiece BPE model with LLaMA's settings (identity normalisation, byte fallback, split digits)."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return directory / "tokenizer.model"


def save_servable_tiny_model(
    directory: Path, *, seed: int = 0, context: int = 256, pad_token: bool = True, **config_overrides
) -> Path:
    """Random LLaMA (float32, context 256 by default) plus the sentencepiece tokenizer, with a [PAD] token
    unless `pad_token` is false; `config_overrides` go to the LlamaConfig (e.g. a GPU-kernel head size)."""
    from transformers import LlamaForCausalLM

    from wombat_core.tokenizer import PAD_TOKEN, load_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    train_llama_like_spm(directory)
    tokenizer = load_tokenizer(directory)
    if pad_token:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    torch.manual_seed(seed)
    config = tiny_config(vocab_size=len(tokenizer), max_position_embeddings=context, bos_token_id=1, eos_token_id=2,
                         **config_overrides)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_wired_model(directory: Path, transitions: dict[int, dict[int, float]], *, hidden: int = 64) -> Path:
    """A LLaMA wired by hand so that after token t the next-token logits are `transitions[t]` (token id ->
    logit; every other logit 0), whatever came before: exact greedy streams for tests.

    Attention and MLP outputs are zeroed, so the last hidden state is the normalised embedding of the
    current token. Each wired token's embedding is its own one-hot direction, which the final RMSNorm
    scales to sqrt(hidden); LM-head row j holds the wanted logits along those directions.
    """
    from transformers import LlamaForCausalLM

    from wombat_core.tokenizer import PAD_TOKEN, load_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    train_llama_like_spm(directory)
    tokenizer = load_tokenizer(directory)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    wired = sorted(set(transitions) | {j for row in transitions.values() for j in row})
    assert len(wired) <= hidden, "each wired token needs its own direction"
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    direction = {token: slot for slot, token in enumerate(wired)}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for token, slot in direction.items():
            model.model.embed_tokens.weight[token] = torch.nn.functional.one_hot(torch.tensor(slot), hidden)
        head = torch.zeros_like(model.lm_head.weight)
        for token, logits in transitions.items():
            for successor, logit in logits.items():
                head[successor, direction[token]] = logit / hidden**0.5
        model.lm_head.weight.copy_(head)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def text_tokens(directory: Path, text: str) -> list[int]:
    """The ids of `text` under the tokenizer `train_llama_like_spm` writes (without the lone "▁" piece)."""
    from wombat_core.tokenizer import load_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    train_llama_like_spm(directory)
    tokenizer = load_tokenizer(directory)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[1:] if tokenizer.convert_ids_to_tokens(ids[0]) == "▁" else ids


def save_cycling_model(directory: Path, text: str) -> tuple[Path, list[int]]:
    """A model that repeats the tokens of `text` forever (greedy). Returns the directory and the cycle."""
    cycle = text_tokens(directory, text)
    assert len(set(cycle)) == len(cycle), "the cycle's tokens must be distinct"
    transitions = {token: {cycle[(i + 1) % len(cycle)]: 10.0} for i, token in enumerate(cycle)}
    return save_wired_model(directory, transitions), cycle


def save_reward_models(directory: Path, policy_dir: Path) -> tuple[Path, Path]:
    """Two tiny reward models sharing the policy's tokenizer: a LlamaForSequenceClassification, and a
    LLaMA body with `value_head.safetensors` (the reference's layout)."""
    from safetensors.torch import save_file
    from transformers import LlamaForSequenceClassification, LlamaModel

    from wombat_core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(policy_dir)
    config = tiny_config(vocab_size=len(tokenizer), max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(1)
    classifier = directory / "reward-cls"
    LlamaForSequenceClassification(config).save_pretrained(classifier)
    tokenizer.save_pretrained(classifier)
    value = directory / "reward-value-head"
    body = LlamaModel(config)
    body.save_pretrained(value)
    tokenizer.save_pretrained(value)
    save_file({"v_head.weight": torch.randn(1, config.hidden_size)}, value / "value_head.safetensors")
    return classifier, value
