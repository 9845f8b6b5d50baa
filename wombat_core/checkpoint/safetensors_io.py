"""Streaming safetensors reader and writer.

Why not `safetensors.torch.save_file` / `safe_open`? `save_file` needs a whole shard in memory (a LLaMA-7B
shard is ~10 GB), and `safe_open` memory-maps the file, so every page it touches counts in the process's
resident memory until the file is closed. Reading with `readinto` at the header's offsets and writing the
header first, then each tensor as soon as it is computed, keeps peak memory at a few tensors. The format
(https://github.com/huggingface/safetensors#format) is small:

    [8-byte little-endian header length N][N bytes of JSON header, space padded][raw tensor bytes]

Files written here are read back by the official library in the tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from wombat_core.errors import CheckpointFormatError, InvalidArgument
from wombat_core.paths import open_confined

# The official library refuses headers above 100 MB; a larger value means a corrupt or hostile file.
MAX_HEADER_BYTES = 100 * 1024 * 1024

ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives inside a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _looks_like_pickle(head: bytes) -> str | None:
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip checkpoint (torch.save)"
    if head[:1] == b"\x80" and head[1:2] in {bytes([p]) for p in range(2, 6)}:
        return "a Python pickle"
    return None


class SafetensorsFile:
    """An open safetensors file whose tensors are read one at a time into fresh memory.

    Use as a context manager. Every structural property the official library checks is checked here, so a
    corrupt or truncated file fails with a CheckpointFormatError naming the file, never with a crash.
    """

    def __init__(self, path: Path, root: Path | None = None):
        """With `root`, the file is opened with `open_confined` (no link out of the root, even a late one)."""
        self.path = Path(path)
        self._file: BinaryIO = open_confined(self.path, root)
        try:
            self.tensors, self.metadata = self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, what: str) -> CheckpointFormatError:
        return CheckpointFormatError(
            f"{self.path.name} is not a valid safetensors file: {what}",
            metadata={"file": self.path.name},
        )

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        file_size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        pickle_kind = _looks_like_pickle(head)
        if pickle_kind:
            raise CheckpointFormatError(
                f"{self.path.name} is {pickle_kind}, not safetensors. Pickles are never loaded as safetensors; "
                "name it *.bin so it is read with torch.load(weights_only=True), or run `wombat convert`.",
                reason="PICKLE_NOT_SAFETENSORS",
                metadata={"file": self.path.name},
            )
        if len(head) < 8:
            raise self._fail(f"file is {file_size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
            raise self._fail(
                f"header length {header_len} does not fit in a {file_size}-byte file (truncated?)"
            )
        raw = self._file.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._fail(f"header is not UTF-8 JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("__metadata__ must map strings to strings")
        data_start = 8 + header_len
        tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, entry in header.items():
            info = self._parse_entry(name, entry, data_start)
            tensors[name] = info
            spans.append((info.offset, info.offset + info.nbytes, name))
        # Tensors must tile the data section exactly: no gaps, no overlaps, nothing past the end.
        position = data_start
        for begin, end, name in sorted(spans):
            if begin != position:
                raise self._fail(
                    f"tensor {name!r} starts at byte {begin - data_start}, expected {position - data_start}"
                )
            position = end
        if position != file_size:
            raise self._fail(
                f"data section ends at byte {position} but the file has {file_size} bytes"
                + (" (truncated)" if position > file_size else "")
            )
        return tensors, metadata

    def _parse_entry(self, name: str, entry: object, data_start: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._fail(f"entry for {name!r} is not an object")
        dtype = ST_TO_TORCH.get(entry.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise self._fail(f"tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise self._fail(f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise self._fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        nbytes = offsets[1] - offsets[0]
        expected = math.prod(shape) * _dtype_size(dtype)
        if nbytes != expected:
            raise self._fail(f"tensor {name!r} of shape {shape} needs {expected} bytes but spans {nbytes}")
        return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], nbytes)

    def read(self, name: str) -> torch.Tensor:
        """Reads one tensor into newly allocated memory (no memory map)."""
        info = self.tensors[name]
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self._file.seek(info.offset)
            got = self._file.readinto(memoryview(buffer.numpy()))
            if got != info.nbytes:
                raise self._fail(f"tensor {name!r} is truncated ({got} of {info.nbytes} bytes)")
        return buffer.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a tensor to be written, known before its values are."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _dtype_size(self.dtype)


class StreamingSafetensorsWriter:
    """Writes a safetensors file tensor by tensor: the header first, then each tensor as it is produced.

    Tensors must be written in the order they were declared. The SHA-256 of the file is computed while
    writing, so the manifest needs no second read. `finish()` flushes and fsyncs; the caller renames.
    """

    def __init__(self, path: Path, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._specs = list(specs)
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for spec in self._specs:
            if spec.dtype not in TORCH_TO_ST:
                raise InvalidArgument(
                    f"tensor {spec.name!r} has dtype {spec.dtype}, which safetensors cannot store"
                )
            header[spec.name] = {
                "dtype": TORCH_TO_ST[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the reference implementation aligns data to 8 bytes
        self._hash = hashlib.sha256()
        self._file: BinaryIO = open(self.path, "xb")  # noqa: SIM115 - closed in finish()/abort()
        self._next = 0
        self.bytes_written = 0
        self._write(struct.pack("<Q", len(encoded)) + encoded)

    def _write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.bytes_written += len(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"expected tensor {spec.name} {spec.dtype} {list(spec.shape)}, "
                f"got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            self._write(memoryview(data.numpy()))
        self._next += 1

    def finish(self) -> str:
        """Flushes and fsyncs the file; returns its SHA-256 hex digest."""
        if self._next != len(self._specs):
            missing = self._specs[self._next].name
            raise ValueError(f"{self.path.name}: tensor {missing!r} was declared but never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._file.close()
