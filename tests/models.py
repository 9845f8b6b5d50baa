"""Tiny random LLaMA checkpoints written as real files, and the naive full-RAM reference delta method."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TINY_VOCAB = 32  # stands in for LLaMA's 32000


def tiny_config(vocab_size: int = TINY_VOCAB, **overrides):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def save_tiny_llama(
    path: Path,
    *,
    seed: int,
    dtype: torch.dtype = torch.float16,
    vocab_size: int = TINY_VOCAB,
    max_shard_size: str | None = None,
    config_overrides: dict | None = None,
) -> Path:
    """A random LLaMA saved with save_pretrained (safetensors; sharded when max_shard_size is given)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab_size, **(config_overrides or {}))).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def derive_finetuned(base: Path, out: Path, *, seed: int, extra_rows: int = 1, scale: float = 0.01) -> Path:
    """A 'fine-tuned' target: base weights nudged multiplicatively, vocab tensors grown by `extra_rows`."""
    state = load_state(base)
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for name, tensor in state.items():
        noise = torch.rand(tensor.shape, generator=generator, dtype=torch.float32) * 2 - 1
        tuned = (tensor.float() * (1 + scale * noise)).to(tensor.dtype)
        if extra_rows and name.endswith(("embed_tokens.weight", "lm_head.weight")):
            new_rows = torch.randn((extra_rows, tensor.shape[1]), generator=generator).to(tensor.dtype) * 0.02
            tuned = torch.cat([tuned, new_rows])
        result[name] = tuned.contiguous()
    out.mkdir(parents=True)
    save_file(result, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["vocab_size"] += extra_rows
    (out / "config.json").write_text(json.dumps(config))
    return out


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    """Loads every tensor of a safetensors checkpoint directory fully into RAM."""
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def naive_apply(base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], dtype=torch.float16):
    """The reference method, in full RAM: resize vocab tensors with zero rows, then base + delta in `dtype`."""
    out = {}
    for name, d in delta.items():
        b = base[name].to(dtype)
        if b.shape[0] < d.shape[0]:
            b = torch.cat([b, torch.zeros((d.shape[0] - b.shape[0], *b.shape[1:]), dtype=dtype)])
        b += d.to(dtype)
        out[name] = b
    return out


def naive_make(base: dict[str, torch.Tensor], target: dict[str, torch.Tensor], dtype=torch.float16):
    out = {}
    for name, t in target.items():
        b = base[name].to(dtype)
        if b.shape[0] < t.shape[0]:
            b = torch.cat([b, torch.zeros((t.shape[0] - b.shape[0], *b.shape[1:]), dtype=dtype)])
        out[name] = t.to(dtype) - b
    return out
