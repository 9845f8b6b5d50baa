"""What is under a model root: one summary per model directory (Describe / ListModels)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wombat_core.atomic import is_internal_name
from wombat_core.checkpoint.layout import Checkpoint, WeightFormat
from wombat_core.errors import FailedPrecondition, NotFound, WombatError
from wombat_core.manifest import Manifest, read_manifest

MAX_LISTED = 10_000  # a root with more model directories than this is listed in part


@dataclass(frozen=True)
class ModelSummary:
    path: str
    format: WeightFormat
    shard_count: int
    tensor_count: int
    weight_bytes: int
    dtypes: tuple[str, ...]
    model_type: str
    vocab_size: int
    manifest: Manifest | None


def describe_model(directory: Path, display: str, *, confine_to: Path | None = None) -> ModelSummary:
    checkpoint = Checkpoint.open(directory, role="model", confine_to=confine_to)
    config = checkpoint.config() or {}
    if checkpoint.format is WeightFormat.SAFETENSORS:
        tensors = checkpoint.tensors
        dtypes = tuple(sorted({str(m.dtype).removeprefix("torch.") for m in tensors.values()}))
        count = len(tensors)
    else:  # describing must not unpickle multi-GB `.bin` shards
        dtypes, count = (), 0
    return ModelSummary(
        path=display,
        format=checkpoint.format,
        shard_count=len(checkpoint.shards),
        tensor_count=count,
        weight_bytes=checkpoint.weight_bytes(),
        dtypes=dtypes,
        model_type=str(config.get("model_type", "")),
        vocab_size=int(config.get("vocab_size", 0) or 0),
        manifest=read_manifest(directory),
    )


def list_models(root: Path, start: Path) -> list[ModelSummary]:
    """Every directory under `start` that holds weights, sorted; partial job outputs are never listed."""
    if not start.is_dir():
        raise NotFound(f"{start.relative_to(root).as_posix()!r} is not a directory under the model root")
    found: list[ModelSummary] = []
    for directory in sorted([start, *(p for p in start.rglob("*") if p.is_dir())]):
        relative = directory.relative_to(root)
        if any(part.startswith(".") or is_internal_name(part) for part in relative.parts):
            continue
        if not directory.resolve().is_relative_to(root):
            continue  # a symlinked directory that leaves the root
        try:
            found.append(describe_model(directory, relative.as_posix() or ".", confine_to=root))
        except FailedPrecondition:
            continue  # not a model directory
        except WombatError:
            continue  # a broken model is reported by Describe, not by listing
        if len(found) >= MAX_LISTED:
            break
    return found
