"""Bit-for-bit comparison of two checkpoints, tensor by tensor (bounded memory)."""

from __future__ import annotations

from pathlib import Path

import torch

from wombat_core.checkpoint.layout import Checkpoint


def checkpoint_differences(a_dir: Path, b_dir: Path, limit: int = 10) -> list[str]:
    """Descriptions of up to `limit` differences; empty means every tensor is bit-identical."""
    a, b = Checkpoint.open(a_dir, role="first"), Checkpoint.open(b_dir, role="second")
    differences = [f"{name}: only in {a_dir.name}" for name in sorted(set(a.tensors) - set(b.tensors))]
    differences += [f"{name}: only in {b_dir.name}" for name in sorted(set(b.tensors) - set(a.tensors))]
    with a.reader() as ra, b.reader() as rb:
        for name in a.tensors:
            if len(differences) >= limit:
                break
            if name not in b.tensors:
                continue
            x, y = ra.read(name), rb.read(name)
            if x.dtype != y.dtype or x.shape != y.shape:
                differences.append(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            elif not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
                differences.append(f"{name}: values differ")
    return differences[:limit]
