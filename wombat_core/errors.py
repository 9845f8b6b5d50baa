"""One error hierarchy for the whole suite.

Core code raises these; `services.scaffold.errors` maps each class to a gRPC status code in one place.
Messages are written for the person who has to fix the input: they say what was wrong and what to do.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import PurePath


class WombatError(Exception):
    """Base of every error the suite reports to a caller.

    `reason` is a stable UPPER_SNAKE identifier (sent as google.rpc.ErrorInfo.reason) and `metadata`
    carries machine-readable details such as the tensor name and both shapes.
    """

    reason = "WOMBAT_ERROR"

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})


class InvalidArgument(WombatError):
    """The request itself is wrong (bad value, bad path syntax, inputs that do not fit together)."""

    reason = "INVALID_ARGUMENT"


class NotFound(WombatError):
    """A named file, directory or job does not exist."""

    reason = "NOT_FOUND"


class AlreadyExists(WombatError):
    """The output the caller asked to create is already there with different contents."""

    reason = "ALREADY_EXISTS"


class PermissionDenied(WombatError):
    """The request reaches outside what the service may touch (for example a symlink out of the root)."""

    reason = "PERMISSION_DENIED"


class FailedPrecondition(WombatError):
    """The system is not in a state that allows the operation (for example no manifest to verify)."""

    reason = "FAILED_PRECONDITION"


class ResourceExhausted(WombatError):
    """A bounded resource (queue, job slots, disk) is full; retrying later may succeed."""

    reason = "RESOURCE_EXHAUSTED"


class Aborted(WombatError):
    """The operation conflicts with a concurrent one (for example the same target being written)."""

    reason = "ABORTED"


class Cancelled(WombatError):
    """The caller cancelled the operation; any partial output has been removed."""

    reason = "CANCELLED"


class Unavailable(WombatError):
    """The service is not ready or is shutting down."""

    reason = "UNAVAILABLE"


# --- Specific errors (subclasses keep the status code of their parent) ---------------------------------


class CheckpointFormatError(InvalidArgument):
    """A weight file is corrupt, truncated, or not the format its name claims."""

    reason = "CHECKPOINT_FORMAT"


class UnsafeCheckpoint(InvalidArgument):
    """A pickle that `torch.load(weights_only=True)` refused: it holds more than tensors."""

    reason = "UNSAFE_PICKLE"


class TensorMismatch(InvalidArgument):
    """Base and delta/target checkpoints do not line up tensor for tensor."""

    reason = "TENSOR_MISMATCH"


class VocabMismatch(TensorMismatch):
    """Vocabulary tensors differ in rows in a way the [PAD]-row resize does not explain."""

    reason = "VOCAB_MISMATCH"


class PathOutsideRoot(PermissionDenied):
    """A path resolves (through a symlink) to somewhere outside the configured root."""

    reason = "PATH_OUTSIDE_ROOT"


# Operating-system failures a caller can act on, by errno: the class to report and what to say. Only the
# file's base name is ever shown (a full server path is none of the caller's business).
_OS_ERRORS: dict[int, tuple[type[WombatError], str]] = {
    errno.ENOSPC: (
        ResourceExhausted,
        "no space left on the server's disk while writing {name}; free space and retry",
    ),
    errno.EDQUOT: (ResourceExhausted, "the disk quota ran out while writing {name}; free space and retry"),
    errno.EFBIG: (ResourceExhausted, "{name} grew past the server's file size limit"),
    errno.EACCES: (
        PermissionDenied,
        "the server may not write or read {name}: check the directory's permissions",
    ),
    errno.EPERM: (
        PermissionDenied,
        "the server may not write or read {name}: check the directory's permissions",
    ),
    errno.EROFS: (FailedPrecondition, "{name} is on a read-only filesystem; write somewhere writable"),
    errno.ENAMETOOLONG: (InvalidArgument, "a path component is too long (at most 255 bytes each)"),
}


def from_os_error(exc: OSError, name: str | None = None) -> WombatError | None:
    """The suite's error for an OSError a caller can act on (disk full, permissions), else None. `name`
    says what was being written; by default the base name of the file in the error."""
    known = _OS_ERRORS.get(exc.errno or 0)
    if known is None:
        return None
    cls, template = known
    if name is None:
        name = PurePath(str(exc.filename)).name if exc.filename else "a file"
    return cls(template.format(name=name), reason=f"OS_{errno.errorcode[exc.errno]}")
