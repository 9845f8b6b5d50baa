"""Tokenizer loading and the Wombat special-token conventions (REFERENCE.md §1-2).

LLaMA checkpoints ship a sentencepiece `tokenizer.model`; transformers builds its `LlamaTokenizer` from
it. The Wombat conventions on top: eos = bos = unk = `</s>`, pad = `[PAD]` (a new token, so the
embedding matrix and LM head grow by one zero row), and left padding for batched generation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from wombat_core.errors import FailedPrecondition, NotFound

log = logging.getLogger(__name__)

PAD_TOKEN = "[PAD]"
LLAMA_SPECIAL_TOKEN = "</s>"


def load_tokenizer(model_dir: Path, *, padding_side: str = "left"):
    """Loads the tokenizer of a local model directory (never from a hub)."""
    from transformers import AutoTokenizer, LlamaTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise NotFound(f"model directory {model_dir.name!r} does not exist")
    has_fast = (model_dir / "tokenizer.json").is_file()
    has_spm = (model_dir / "tokenizer.model").is_file()
    if not (has_fast or has_spm):
        raise FailedPrecondition(f"{model_dir.name} has no tokenizer.json or tokenizer.model")
    if has_spm and not has_fast:
        # The sentencepiece path: LLaMA's own tokenizer.model, with BOS added like the reference's slow tokenizer.
        tokenizer = LlamaTokenizer.from_pretrained(str(model_dir), local_files_only=True, add_bos_token=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    tokenizer.padding_side = padding_side
    return tokenizer


def add_wombat_special_tokens(tokenizer, *, llama_conventions: bool = True) -> int:
    """Adds `[PAD]` (when the tokenizer has no pad token) and, for LLaMA, sets eos = bos = unk = `</s>`.

    Returns how many tokens were added, which is how many zero rows the embeddings need.
    """
    added = 0
    if tokenizer.pad_token is None:
        added = tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if llama_conventions:
        tokenizer.eos_token = tokenizer.bos_token = tokenizer.unk_token = LLAMA_SPECIAL_TOKEN
        # Fast tokenizers keep prepending the old BOS id until their post-processor is rebuilt; the
        # reference's slow tokenizer prepends the new one (`</s>`), which is what Wombat was trained with.
        if hasattr(tokenizer, "update_post_processor"):
            tokenizer.update_post_processor()
    return added


def resize_embeddings_with_zero_rows(model: torch.nn.Module, new_vocab_size: int) -> int:
    """Grows the input embedding and LM head to `new_vocab_size`, setting the new rows to zero (as the
    reference does after adding [PAD]). Returns the number of rows added."""
    old = model.get_input_embeddings().weight.shape[0]
    if new_vocab_size <= old:
        return 0
    model.resize_token_embeddings(new_vocab_size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:] = 0
        output = model.get_output_embeddings()
        if output is not None:
            output.weight[old:] = 0
    return new_vocab_size - old
