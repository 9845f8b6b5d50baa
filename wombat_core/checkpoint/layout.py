"""Hugging Face model directories: which files hold which tensors, and reading them one at a time.

Supported layouts, in order of preference:
  model.safetensors | model.safetensors.index.json + shards | pytorch_model.bin |
  pytorch_model.bin.index.json + shards
Every file the directory refers to (shards named by an index, tokenizer files) must stay inside the
directory's confinement root, so a hostile index cannot make us read /etc/passwd.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from wombat_core.checkpoint.legacy_bin import load_bin_state_dict
from wombat_core.checkpoint.safetensors_io import SafetensorsFile
from wombat_core.errors import CheckpointFormatError, FailedPrecondition, NotFound, PathOutsideRoot
from wombat_core.paths import open_confined

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
INDEX_FILES = (SAFETENSORS_INDEX, BIN_INDEX)


class WeightFormat(enum.Enum):
    SAFETENSORS = "safetensors"
    PYTORCH_BIN = "pytorch_bin"


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: str  # file name inside the checkpoint directory

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in INDEX_FILES


def confined_file(directory: Path, name: str, root: Path | None) -> Path:
    """Returns directory/name after checking that it is a plain file name that stays inside `root`."""
    if not name or "/" in name or "\\" in name or name in {".", ".."}:
        raise CheckpointFormatError(f"{directory.name}: shard name {name!r} is not a plain file name")
    path = directory / name
    if root is not None and not path.resolve().is_relative_to(root):
        raise PathOutsideRoot(
            f"{directory.name}/{name} is a link that leaves the model root; refusing to read it"
        )
    return path


class Checkpoint:
    """A model directory. Tensor metadata is read from headers only; values are read on demand."""

    def __init__(self, path: Path, fmt: WeightFormat, shards: list[str], confine_to: Path | None):
        self.path = path
        self.format = fmt
        self.shards = shards
        self._root = confine_to
        self._tensors: dict[str, TensorMeta] | None = None

    @classmethod
    def open(cls, path: Path, *, role: str = "checkpoint", confine_to: Path | None = None) -> Checkpoint:
        path = Path(path)
        if not path.exists():
            raise NotFound(f"{role} directory {path.name!r} does not exist", metadata={"role": role})
        if not path.is_dir():
            raise FailedPrecondition(
                f"{role} {path.name!r} is a file; give the model directory that contains it"
            )
        for index_name, fmt in (
            (SAFETENSORS_INDEX, WeightFormat.SAFETENSORS),
            (BIN_INDEX, WeightFormat.PYTORCH_BIN),
        ):
            if (path / index_name).is_file():
                shards = sorted(set(_read_index(path / index_name).values()))
                for shard in shards:
                    if not confined_file(path, shard, confine_to).is_file():
                        raise NotFound(f"{role} {path.name}: shard {shard} named by {index_name} is missing")
                return cls(path, fmt, shards, confine_to)
        for single, fmt in (
            (SAFETENSORS_SINGLE, WeightFormat.SAFETENSORS),
            (BIN_SINGLE, WeightFormat.PYTORCH_BIN),
        ):
            if (path / single).is_file():
                confined_file(path, single, confine_to)
                return cls(path, fmt, [single], confine_to)
        loose = sorted(p.name for p in path.glob("*.safetensors"))
        if len(loose) == 1:
            return cls(path, WeightFormat.SAFETENSORS, loose, confine_to)
        raise FailedPrecondition(
            f"{role} directory {path.name!r} holds no weights: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
            f"{BIN_SINGLE} or {BIN_INDEX}",
            metadata={"role": role},
        )

    def file(self, name: str) -> Path:
        return confined_file(self.path, name, self._root)

    @property
    def root(self) -> Path | None:
        """The directory every file read must stay inside, if confined."""
        return self._root

    def open_file(self, name: str) -> BinaryIO:
        """Opens one of the checkpoint's files for reading, confined like every weight read."""
        return open_confined(self.file(name), self._root)

    @property
    def tensors(self) -> dict[str, TensorMeta]:
        """Name -> metadata for every tensor, in shard order then file order."""
        if self._tensors is None:
            found: dict[str, TensorMeta] = {}
            for shard in self.shards:
                for meta in self._shard_metas(shard):
                    if meta.name in found:
                        raise CheckpointFormatError(
                            f"{self.path.name}: tensor {meta.name} appears in both {found[meta.name].shard} and {shard}"
                        )
                    found[meta.name] = meta
            self._tensors = found
        return self._tensors

    def _shard_metas(self, shard: str) -> list[TensorMeta]:
        if self.format is WeightFormat.SAFETENSORS:
            with SafetensorsFile(self.file(shard), root=self._root) as f:
                infos = sorted(f.tensors.values(), key=lambda i: i.offset)
                return [TensorMeta(i.name, i.dtype, i.shape, shard) for i in infos]
        state = load_bin_state_dict(self.file(shard), root=self._root)
        return [TensorMeta(name, t.dtype, tuple(t.shape), shard) for name, t in state.items()]

    def weight_bytes(self) -> int:
        return sum(self.file(s).stat().st_size for s in self.shards)

    def config(self) -> dict | None:
        config_path = self.path / "config.json"
        if not config_path.is_file():
            return None
        try:
            return json.loads(self.file("config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointFormatError(f"{self.path.name}/config.json is not valid JSON: {exc}") from None

    def auxiliary_files(self) -> list[str]:
        """Top-level non-weight files (config, tokenizer, generation config): copied alongside outputs."""
        names = []
        for entry in sorted(self.path.iterdir()):
            if (
                entry.name.startswith(".")
                or is_weight_file(entry.name)
                or entry.name == "wombat-manifest.json"
            ):
                continue
            if entry.is_file():
                names.append(self.file(entry.name).name)
        return names

    @contextmanager
    def reader(self) -> Iterator[TensorReader]:
        reader = TensorReader(self)
        try:
            yield reader
        finally:
            reader.close()


class TensorReader:
    """Reads tensors by name, keeping at most one shard open (one loaded `.bin` shard) at a time."""

    def __init__(self, checkpoint: Checkpoint):
        self._checkpoint = checkpoint
        self._open_shard: str | None = None
        self._handle: SafetensorsFile | dict[str, torch.Tensor] | None = None

    def read(self, name: str) -> torch.Tensor:
        meta = self._checkpoint.tensors[name]
        if self._open_shard != meta.shard:
            self.close()
            if self._checkpoint.format is WeightFormat.SAFETENSORS:
                self._handle = SafetensorsFile(self._checkpoint.file(meta.shard), root=self._checkpoint.root)
            else:
                self._handle = load_bin_state_dict(
                    self._checkpoint.file(meta.shard), root=self._checkpoint.root
                )
            self._open_shard = meta.shard
        if isinstance(self._handle, SafetensorsFile):
            return self._handle.read(name)
        assert self._handle is not None
        return self._handle[name].clone()  # detach from the memory map and from tied storage

    def close(self) -> None:
        if isinstance(self._handle, SafetensorsFile):
            self._handle.close()
        self._handle, self._open_shard = None, None


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointFormatError(f"{index_path.name} is not a valid weight index: {exc}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointFormatError(f"{index_path.name}: weight_map must map tensor names to file names")
    return weight_map
