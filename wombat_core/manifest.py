"""Manifests: what a Wombat job wrote (sha256 of every file) and what it read (input fingerprints)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from wombat_core import __version__
from wombat_core.errors import CheckpointFormatError, FailedPrecondition

MANIFEST_NAME = "wombat-manifest.json"
MANIFEST_FORMAT = "wombat-manifest/1"
_CHUNK = 8 * 1024 * 1024
_EDGE = 1024 * 1024  # bytes from each end of a weight file that go into its fingerprint


class ManifestKind(StrEnum):
    """What wrote a directory (`Manifest.kind`; common.proto documents the same list)."""

    MATERIALIZE = "materialize"  # base + delta
    MAKE_DELTA = "make-delta"  # target - base
    CONVERT = "convert"  # legacy .bin -> safetensors
    RRHF_TRAIN = "rrhf-train"  # an RRHF training job's final model
    PREPARE_DEMO_MODEL = "prepare-demo-model"  # SmolLM2 converted from its GGUF wheel


@dataclass(frozen=True)
class FileDigest:
    path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class InputFingerprint:
    role: str
    path: str
    sha256: str


@dataclass(frozen=True)
class Manifest:
    kind: str  # a ManifestKind value (a plain str, so a manifest from a newer version still reads)
    inputs: tuple[InputFingerprint, ...]
    options: Mapping[str, str]
    files: tuple[FileDigest, ...]
    format: str = MANIFEST_FORMAT
    created_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    tool_version: str = __version__

    def same_job(self, kind: str, inputs: tuple[InputFingerprint, ...], options: Mapping[str, str]) -> bool:
        """True when this manifest records the same job: same kind, input contents and options (paths may move)."""
        ours = sorted((i.role, i.sha256) for i in self.inputs)
        theirs = sorted((i.role, i.sha256) for i in inputs)
        return self.kind == kind and ours == theirs and dict(self.options) == dict(options)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        return cls(
            kind=raw["kind"],
            inputs=tuple(InputFingerprint(**i) for i in raw["inputs"]),
            options=dict(raw["options"]),
            files=tuple(FileDigest(**f) for f in raw["files"]),
            format=raw["format"],
            created_at=raw["created_at"],
            tool_version=raw["tool_version"],
        )


def read_manifest(directory: Path) -> Manifest | None:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return Manifest.from_json(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointFormatError(f"{Path(directory).name}/{MANIFEST_NAME} is corrupt: {exc}") from None


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return digest.hexdigest()


def fingerprint_files(role: str, display_path: str, files: list[Path]) -> InputFingerprint:
    """Identifies an input without reading all of it: names, sizes, and the first and last MiB of each file.

    The first MiB holds a safetensors header (every tensor's name, dtype, shape and offsets), so any change
    of layout or size shows. A full content hash would cost a second read of a 13 GB base; outputs are
    content-hashed in full instead.
    """
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_EDGE))
            if size > 2 * _EDGE:
                f.seek(size - _EDGE)
                digest.update(f.read(_EDGE))
    return InputFingerprint(role=role, path=display_path, sha256=digest.hexdigest())


@dataclass(frozen=True)
class FileCheck:
    path: str
    status: str  # "ok" | "mismatch" | "missing" | "unexpected"
    expected_sha256: str
    actual_sha256: str


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    files: tuple[FileCheck, ...]
    bytes_checked: int
    manifest: Manifest


def list_payload_files(directory: Path) -> list[str]:
    """Every regular file under `directory` except the manifest, as sorted '/'-separated relative paths."""
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    )


def verify_directory(directory: Path, on_bytes: Callable[[int], None] | None = None) -> VerifyReport:
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise FailedPrecondition(
            f"{directory.name} has no {MANIFEST_NAME}; only directories written by wombat can be verified"
        )
    checks, checked = [], 0
    for entry in manifest.files:
        path = directory / entry.path
        if not path.is_file():
            checks.append(FileCheck(entry.path, "missing", entry.sha256, ""))
            continue
        actual = sha256_file(path, on_bytes)
        checked += path.stat().st_size
        status = "ok" if actual == entry.sha256 and path.stat().st_size == entry.size_bytes else "mismatch"
        checks.append(FileCheck(entry.path, status, entry.sha256, actual))
    listed = {f.path for f in manifest.files}
    for extra in list_payload_files(directory):
        if extra not in listed:
            checks.append(FileCheck(extra, "unexpected", "", ""))
    ok = all(c.status == "ok" for c in checks)
    return VerifyReport(ok=ok, files=tuple(checks), bytes_checked=checked, manifest=manifest)
