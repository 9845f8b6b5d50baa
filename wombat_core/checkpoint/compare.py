"""Bit-for-bit comparison of checkpoints, tensor by tensor (bounded memory)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from wombat_core.checkpoint.layout import Checkpoint


def _as(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _unsigned_zeros(tensor: torch.Tensor) -> torch.Tensor:
    # -0.0 + 0.0 == +0.0 under round-to-nearest; every other value is unchanged.
    return tensor + 0.0 if tensor.is_floating_point() else tensor


def checkpoint_differences(a_dir: Path, b_dir: Path, limit: int = 10, *, a_as: torch.dtype | None = None,
                           signed_zeros: bool = True) -> list[str]:  # fmt: skip
    """Descriptions of up to `limit` differences; empty means every tensor is bit-identical. `a_as` casts
    the first checkpoint's floating tensors first (e.g. a float32 fine-tune against its float16 release).
    With signed_zeros=False, -0.0 equals +0.0: base + delta can never produce -0.0 where the base is
    non-zero (x + -x is +0.0), so a recovered model holds +0.0 wherever its original held -0.0."""
    a, b = Checkpoint.open(a_dir, role="first"), Checkpoint.open(b_dir, role="second")
    differences = [f"{name}: only in {a_dir.name}" for name in sorted(set(a.tensors) - set(b.tensors))]
    differences += [f"{name}: only in {b_dir.name}" for name in sorted(set(b.tensors) - set(a.tensors))]
    with a.reader() as ra, b.reader() as rb:
        for name in a.tensors:
            if len(differences) >= limit:
                break
            if name not in b.tensors:
                continue
            x, y = _as(ra.read(name), a_as), rb.read(name)
            if not signed_zeros:
                x, y = _unsigned_zeros(x), _unsigned_zeros(y)
            if x.dtype != y.dtype or x.shape != y.shape:
                differences.append(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            elif not torch.equal(_bytes(x), _bytes(y)):
                differences.append(f"{name}: values differ")
    return differences[:limit]


def tensors_digest(directory: Path, *, as_dtype: torch.dtype | None = None) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) in name order: equal digests mean equal
    weights whatever the sharding or file layout. `as_dtype` casts floating tensors first. Zeros are
    hashed unsigned (see checkpoint_differences), so this is a digest of the values."""
    checkpoint = Checkpoint.open(directory, role="checkpoint")
    digest = hashlib.sha256()
    with checkpoint.reader() as reader:
        for name in sorted(checkpoint.tensors):
            tensor = _unsigned_zeros(_as(reader.read(name), as_dtype))
            digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
            digest.update(_bytes(tensor).numpy().tobytes())
    return digest.hexdigest()
