"""Confinement of client-supplied paths to a configured root directory.

Clients name files relative to the root. Absolute paths, `..` components and NUL bytes are refused as
INVALID_ARGUMENT (the request is malformed); a path whose real location, after following symlinks, lies
outside the root is refused as PERMISSION_DENIED.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from wombat_core.errors import InvalidArgument, NotFound, PathOutsideRoot

MAX_PATH_CHARS = 4096


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
