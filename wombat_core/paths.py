"""Confinement of client-supplied paths to a configured root directory.

Clients name files relative to the root. Absolute paths, `..` components and NUL bytes are refused as
INVALID_ARGUMENT (the request is malformed); a path whose real location, after following symlinks, lies
outside the root is refused as PERMISSION_DENIED.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from wombat_core.errors import InvalidArgument, NotFound, PathOutsideRoot

MAX_PATH_CHARS = 4096
MAX_NAME_BYTES = 255  # NAME_MAX on Linux filesystems


class ConfinedRoot:
    def __init__(self, root: Path):
        self.root = Path(root).resolve(strict=True)

    def resolve(self, relative: str, *, field: str = "path", must_exist: bool = False) -> Path:
        if not relative:
            raise InvalidArgument(f"{field} is empty; give a path relative to the model root")
        if len(relative) > MAX_PATH_CHARS or "\0" in relative:
            raise InvalidArgument(f"{field} is not a valid path (too long or contains NUL)")
        pure = PurePosixPath(relative)
        if pure.is_absolute() or relative.startswith("\\"):
            raise InvalidArgument(f"{field} {relative!r} is absolute; give a path relative to the model root")
        if ".." in pure.parts:
            raise InvalidArgument(
                f"{field} {relative!r} contains '..'; paths must stay inside the model root"
            )
        if any(len(part.encode()) > MAX_NAME_BYTES for part in pure.parts):
            raise InvalidArgument(f"{field} has a component longer than {MAX_NAME_BYTES} bytes")
        real = (self.root / pure).resolve()
        if not real.is_relative_to(self.root):
            raise PathOutsideRoot(
                f"{field} {relative!r} leads outside the model root through a symbolic link",
                metadata={"field": field},
            )
        if must_exist and not real.exists():
            raise NotFound(
                f"{field} {relative!r} does not exist under the model root", metadata={"field": field}
            )
        return real

    def display(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix() or "."


def open_confined(path: Path, root: Path | None) -> BinaryIO:
    """Opens `path` for reading so that it cannot lead outside `root`, even if the tree changes meanwhile.

    Symbolic links that stay inside the root are resolved first (the real path must lie inside it). Then
    every component below the root is opened with O_NOFOLLOW relative to its parent's descriptor, so a
    link swapped in after that check is refused instead of followed (no time-of-check/time-of-use gap).
    The file must be a regular file with a single link: a hard link can make a file from outside the
    root appear inside it, and nothing on the file tells where else it is linked from. Without a root
    the file is opened as usual.
    """
    path = Path(path)
    if root is None:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    root = Path(root)
    real = path.resolve()
    if not real.is_relative_to(root):
        raise PathOutsideRoot(f"{path.name} is a link that leaves the model root; refusing to read it")
    parts = real.relative_to(root).parts
    if not parts:
        raise InvalidArgument(f"{path.name} is the model root itself, not a file")
    descriptor = _open_below(root, parts, path.name)
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode):
        os.close(descriptor)
        raise InvalidArgument(f"{path.name} is not a regular file")
    if status.st_nlink > 1:
        os.close(descriptor)
        raise PathOutsideRoot(
            f"{path.name} has {status.st_nlink} hard links; a hard link can bring a file from outside the "
            "model root inside it, so the server refuses such files. Copy the file instead of linking it."
        )
    return os.fdopen(descriptor, "rb")


def _open_below(root: Path, parts: tuple[str, ...], display: str) -> int:
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            below = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
            os.close(directory)
            directory = below
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=directory)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PathOutsideRoot(
                f"{display}: a part of its path became a symbolic link while it was being opened; refusing it"
            ) from None
        if exc.errno == errno.ENOENT:
            raise NotFound(f"{display} does not exist under the model root") from None
        raise
    finally:
        os.close(directory)
