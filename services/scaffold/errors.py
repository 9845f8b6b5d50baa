"""The one place that maps core errors to gRPC status codes (with google.rpc.ErrorInfo details)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from wombat_core import errors

ERROR_DOMAIN = "wombat"

_CODES: list[tuple[type[errors.WombatError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
]


def status_code_for(error: errors.WombatError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def rich_status(code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str]) -> tuple:
    """Trailing metadata carrying a google.rpc.Status with an ErrorInfo (grpcio-status encodes it), for
    clients that read details with `rpc_status.from_call` (clients.base.error_info does)."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return rpc_status.to_status(status).trailing_metadata
