"""Legacy PyTorch `.bin` checkpoints, read only through `torch.load(weights_only=True)`.

The public Wombat deltas are published in this format. A full unpickle would run arbitrary code from the
file, so it is never used: weights_only=True only rebuilds tensors and plain containers and refuses
anything else, which is reported as UnsafeCheckpoint.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from wombat_core.errors import CheckpointFormatError, UnsafeCheckpoint
from wombat_core.paths import open_confined


def load_bin_state_dict(path: Path, root: Path | None = None) -> dict[str, torch.Tensor]:
    """Loads a `.bin` state dict safely. Zip-format files are memory-mapped, so tensors load lazily.
    With `root`, the file is opened with `open_confined` and loaded through its descriptor."""
    path = Path(path)
    if root is None:
        return _load(path, path.name)
    with open_confined(path, root) as handle:
        # torch.load memory-maps only by file name: /proc/self/fd/N names the file already opened
        # (without /proc, the checked path is used).
        opened = Path(f"/proc/self/fd/{handle.fileno()}")
        return _load(opened if opened.exists() else path, path.name)


def _load(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        # mmap only works for the zip format that torch.save has written since 1.6.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpoint(
            f"{name} was refused by torch.load(weights_only=True): it contains objects other than "
            f"tensors, so it is not loaded (a full unpickle could run code from the file). Detail: {exc}",
            metadata={"file": name},
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        raise CheckpointFormatError(
            f"{name} is not a readable PyTorch checkpoint (corrupt or truncated?): {exc}",
            metadata={"file": name},
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointFormatError(
            f"{name} does not hold a flat mapping of parameter names to tensors",
            metadata={"file": name},
        )
    return state
