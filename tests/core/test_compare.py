"""Checkpoint comparison: bit-for-bit by default, value-for-value on request, digests independent of sharding."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from tests.models import save_tiny_llama
from wombat_core.checkpoint.compare import checkpoint_differences, tensors_digest


def _rewrite(directory, change) -> None:
    """Applies `change(name, tensor)` to every tensor of a single-file checkpoint."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    save_file({name: change(name, t) for name, t in tensors.items()}, path, metadata={"format": "pt"})


def test_digest_ignores_sharding_but_not_values(tmp_path):
    one = save_tiny_llama(tmp_path / "one", seed=3)
    sharded = save_tiny_llama(tmp_path / "sharded", seed=3, max_shard_size="5KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert tensors_digest(one) == tensors_digest(sharded)
    assert checkpoint_differences(one, sharded) == []
    other = save_tiny_llama(tmp_path / "other", seed=4)
    assert tensors_digest(one) != tensors_digest(other)


def test_negative_zero_differs_in_bits_but_not_in_value(tmp_path):
    a = save_tiny_llama(tmp_path / "a", seed=5)
    b = save_tiny_llama(tmp_path / "b", seed=5)
    first = sorted(load_file(a / "model.safetensors"))[0]

    def first_element(value: float):
        def change(name, tensor):
            if name == first:
                tensor = tensor.clone()
                tensor.view(-1)[0] = value
            return tensor

        return change

    _rewrite(a, first_element(-0.0))
    _rewrite(b, first_element(0.0))
    assert checkpoint_differences(a, b) == [f"{first}: values differ"]
    assert checkpoint_differences(a, b, signed_zeros=False) == []
    assert tensors_digest(a) == tensors_digest(b)


def test_cast_before_comparing(tmp_path):
    full = save_tiny_llama(tmp_path / "full", seed=6, dtype=torch.float32)
    half = save_tiny_llama(tmp_path / "half", seed=6, dtype=torch.float32)
    _rewrite(half, lambda name, t: t.to(torch.float16) if t.is_floating_point() else t)
    assert checkpoint_differences(full, half)  # dtypes differ
    assert checkpoint_differences(full, half, a_as=torch.float16) == []
    assert tensors_digest(full, as_dtype=torch.float16) == tensors_digest(half)
