"""Atomic output: a file or a job's directory appears complete (a directory with its manifest) or not at all.

`write_file_atomically` is the one way the suite replaces a single file (job state, a stack's state,
candidate JSONL): a temporary file beside it, fsynced, renamed over it, the directory fsynced.

A directory (`AtomicOutputDir`): take an exclusive lock on `.<name>.wombat-lock` beside the target (so two jobs never write the
same target, across processes too); remove any `.<name>.wombat-partial-*` left by a killed job (the lock
proves no live job owns it); write into a fresh partial directory on the same filesystem; fsync every file
and the directory; rename it to the target; fsync the parent. A crash at any point leaves either no target
or the complete one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid
from pathlib import Path
from types import TracebackType

from wombat_core.errors import Aborted, AlreadyExists, FailedPrecondition, from_os_error
from wombat_core.manifest import MANIFEST_NAME, FileDigest, Manifest, list_payload_files, sha256_file

log = logging.getLogger(__name__)

PARTIAL_MARK = ".wombat-partial-"
LOCK_SUFFIX = ".wombat-lock"


def is_internal_name(name: str) -> bool:
    """Names of the lock files and partial directories that listings must hide."""
    return name.startswith(".") and (PARTIAL_MARK in name or name.endswith(LOCK_SUFFIX))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: str | bytes) -> None:
    """Replaces `path` with `data`; a crash leaves the old file or the new one, never a torn one."""
    path = Path(path)
    temporary = path.parent / f".{path.name}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def _readable(path: Path, *, directory: bool = False) -> None:
    """The permissions a plainly created file or directory gets (0644 / 0755 under the umask). Some
    writers (safetensors' save_file, hence transformers' save_pretrained) create 0600 files, and a model
    that only its writer's uid can read breaks a server running as another user on the same store."""
    path.chmod((0o755 if directory else 0o644) & ~_umask())


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which
    would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


class AtomicOutputDir:
    """Context manager for one job's output. Write into `.path`, then call `commit(...)`."""

    def __init__(self, target: Path):
        self.target = Path(target)
        parent = self.target.parent
        if parent.exists() and not parent.is_dir():
            raise FailedPrecondition(f"the parent of {self.target.name!r} is a file, not a directory")
        self._lock_path = parent / f".{self.target.name}{LOCK_SUFFIX}"
        self._lock_fd: int | None = None
        self.path = parent / f".{self.target.name}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}"
        self._digests: dict[str, FileDigest] = {}
        self.committed = False

    def __enter__(self) -> AtomicOutputDir:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._release_lock()
            raise Aborted(
                f"another job is already writing {self.target.name!r}; wait for it to finish"
            ) from None
        except OSError as exc:
            self._release_lock()
            raise (from_os_error(exc, name=self.target.name) or exc) from exc
        self._remove_stale_partials()
        try:
            self.path.mkdir()
        except OSError as exc:
            self._release_lock()
            raise (from_os_error(exc, name=self.target.name) or exc) from exc
        return self

    def _remove_stale_partials(self) -> None:
        for stale in self.target.parent.glob(f".{self.target.name}{PARTIAL_MARK}*"):
            log.warning("removing %s left by an interrupted job", stale.name)
            shutil.rmtree(stale, ignore_errors=True)

    def record(self, relative: str, sha256: str, size: int) -> None:
        """Records a digest computed while writing, so commit() need not re-read that file."""
        self._digests[relative] = FileDigest(relative, size, sha256)

    def commit(self, manifest_without_files: Manifest) -> Manifest:
        if self.target.exists():
            raise AlreadyExists(f"{self.target.name!r} appeared while the job ran; the result was discarded")
        files = []
        for relative in list_payload_files(self.path):
            path = self.path / relative
            digest = self._digests.get(relative)
            if digest is None or digest.size_bytes != path.stat().st_size:
                digest = FileDigest(relative, path.stat().st_size, sha256_file(path))
            files.append(digest)
            _readable(path)
            fsync_path(path)
        manifest = Manifest(
            kind=manifest_without_files.kind,
            inputs=manifest_without_files.inputs,
            options=manifest_without_files.options,
            files=tuple(files),
        )
        manifest_path = self.path / MANIFEST_NAME
        manifest_path.write_text(manifest.to_json())
        fsync_path(manifest_path)
        _readable(self.path, directory=True)
        fsync_path(self.path)
        os.rename(self.path, self.target)
        fsync_path(self.target.parent)
        self.committed = True
        return manifest

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ):
        try:
            if not self.committed:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self._release_lock()
        if isinstance(exc, OSError):
            mapped = from_os_error(exc, name=self.target.name)  # disk full, permissions: the caller's to fix
            if mapped is not None:
                raise mapped from exc
        return False
