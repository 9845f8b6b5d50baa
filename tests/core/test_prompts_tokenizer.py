"""Alpaca prompt bytes and the sentencepiece LLaMA tokenizer conventions ([PAD], </s>, embedding resize)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from tests.engine_fixtures import train_llama_like_spm
from tests.models import tiny_config
from wombat_core.prompts import alpaca_prompt, alpaca_prompt_from_query, extract_response
from wombat_core.tokenizer import add_wombat_special_tokens, load_tokenizer, resize_embeddings_with_zero_rows

# Written out byte for byte from REFERENCE.md §2, independently of the module's constants.
EXPECTED_NO_INPUT = (
    b"Below is an instruction that describes a task. Write a response that appropriately completes the request."
    b"\n\n### Instruction:\nName a colour.\n\n### Response:"
)
EXPECTED_WITH_INPUT = (
    b"Below is an instruction that describes a task, paired with an input that provides further context. "
    b"Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n"
    b"### Input:\nBonjour\n\n### Response:"
)


def test_alpaca_prompt_bytes_match_the_reference():
    assert alpaca_prompt("Name a colour.").encode() == EXPECTED_NO_INPUT
    assert alpaca_prompt("Translate.", "Bonjour").encode() == EXPECTED_WITH_INPUT
    assert not alpaca_prompt("x").endswith(" ")


def test_query_split_first_line_instruction_rest_input():
    assert alpaca_prompt_from_query("Translate.\nBonjour").encode() == EXPECTED_WITH_INPUT
    assert alpaca_prompt_from_query("Name a colour.").encode() == EXPECTED_NO_INPUT


def test_response_extraction_cuts_at_first_eos_and_strips():
    text = alpaca_prompt("Hi") + "  Hello there! </s> junk"
    assert extract_response(text) == "Hello there!"


@pytest.fixture(scope="module")
def llama_like_tokenizer_dir(tmp_path_factory) -> Path:
    """A sentencepiece BPE model trained here with LLaMA's settings (see tests/engine_fixtures.py)."""
    directory = tmp_path_factory.mktemp("spm")
    train_llama_like_spm(directory)
    return directory


@pytest.mark.parametrize("text", [EXPECTED_WITH_INPUT.decode(), "Red, green and blue.", "你好 🙂 café 42"])
def test_sentencepiece_path_matches_sentencepiece_itself(llama_like_tokenizer_dir, text):
    tokenizer = load_tokenizer(llama_like_tokenizer_dir)
    processor = spm.SentencePieceProcessor(model_file=str(llama_like_tokenizer_dir / "tokenizer.model"))
    assert tokenizer(text).input_ids == [processor.bos_id(), *processor.encode(text)]
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert tokenizer.padding_side == "left"


def test_wombat_special_tokens_and_zero_pad_row(llama_like_tokenizer_dir):
    from transformers import LlamaForCausalLM

    tokenizer = load_tokenizer(llama_like_tokenizer_dir)
    base_vocab = len(tokenizer)
    assert add_wombat_special_tokens(tokenizer) == 1
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == base_vocab
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == "</s>"
    assert tokenizer.eos_token_id == 2
    assert tokenizer("x").input_ids[0] == 2  # BOS really is </s> now, as with the reference's slow tokenizer
    assert len(tokenizer) == base_vocab + 1

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=base_vocab))
    before = model.get_input_embeddings().weight.detach().clone()
    assert resize_embeddings_with_zero_rows(model, len(tokenizer)) == 1
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == base_vocab + 1
    assert torch.equal(embeddings[:base_vocab], before)
    assert torch.count_nonzero(embeddings[base_vocab:]) == 0
    assert torch.count_nonzero(model.get_output_embeddings().weight[base_vocab:]) == 0
    batch = tokenizer(["short", "a longer sentence here"], padding=True)
    assert batch.input_ids[0][0] == tokenizer.pad_token_id  # left padding


# A chat template that declares tool use, in the way tool-trained models' templates do (Hermes-style).
TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{% for tool in tools %}{{ tool['function']['name'] }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_chat_tools_are_rendered_by_a_template_that_declares_them_and_refused_otherwise(
    llama_like_tokenizer_dir,
):
    import json

    from wombat_core.engine.prompting import PromptFormat, PromptSpec, encode
    from wombat_core.errors import InvalidArgument

    tokenizer = load_tokenizer(llama_like_tokenizer_dir)
    tools = json.dumps(
        [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    )
    spec = PromptSpec(PromptFormat.CHAT, messages=(("user", "Weather?"),), tools_json=tools)
    tokenizer.chat_template = TOOLS_TEMPLATE
    assert (
        encode(spec, tokenizer, PromptFormat.CHAT).rendered
        == "<tools>get_weather;</tools><user>Weather?<assistant>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(InvalidArgument, match="does not declare tool use") as caught:
        encode(spec, tokenizer, PromptFormat.CHAT)
    assert caught.value.metadata["field"] == "tools"
