"""The one base of every Wombat client: the channel (plaintext, TLS or mTLS), the bearer token, a deadline
on every call, and gRPC's own retry policy for the idempotent methods a client names.

Calls that start work (generation, jobs) are never retried implicitly: a retry after a lost connection
could duplicate streamed output or start a second job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import ClassVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from wombat_core.errors import InvalidArgument

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Where callers configured by the environment (the CLI, scripts) find the token and TLS files.
TOKEN_ENV = "WOMBAT_AUTH_TOKEN"
TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV = "WOMBAT_TLS_CA_FILE", "WOMBAT_TLS_CERT_FILE", "WOMBAT_TLS_KEY_FILE"


@dataclass(frozen=True)
class ChannelSettings:
    address: str
    token: str | None = None
    ca_file: Path | None = None  # enables TLS
    client_cert_file: Path | None = None  # mTLS
    client_key_file: Path | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # The name the server's TLS certificate must carry, when `address` is an IP address (a gateway that
    # dials each pod behind a headless Service by IP verifies them by the Service's name).
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise InvalidArgument(
                f"a client certificate and its key go together (${TLS_CERT_ENV} and ${TLS_KEY_ENV})"
            )
        if self.client_cert_file is not None and self.ca_file is None:
            raise InvalidArgument(
                f"a client certificate needs TLS: set ${TLS_CA_ENV} to the CA that signed the server's certificate"
            )

    @classmethod
    def from_env(cls, address: str) -> ChannelSettings:
        """The token from $WOMBAT_AUTH_TOKEN; TLS from $WOMBAT_TLS_CA_FILE (the CA that signed the server's
        certificate), plus $WOMBAT_TLS_CERT_FILE and $WOMBAT_TLS_KEY_FILE for mutual TLS."""

        def path(name: str) -> Path | None:
            value = os.environ.get(name)
            return Path(value) if value else None

        return cls(address, token=os.environ.get(TOKEN_ENV) or None, ca_file=path(TLS_CA_ENV),
                   client_cert_file=path(TLS_CERT_ENV), client_key_file=path(TLS_KEY_ENV))  # fmt: skip

    def metadata(self, request_id: str | None = None) -> list[tuple[str, str]]:
        metadata = []
        if self.token:
            metadata.append(("authorization", f"Bearer {self.token}"))
        if request_id:
            metadata.append(("x-request-id", request_id))
        return metadata

    def options(self, service_config: str | None = None) -> list[tuple[str, object]]:
        """Channel options; `service_config` is a gRPC service config JSON (per-method retry policies)."""
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
        if service_config:
            options += [("grpc.service_config", service_config), ("grpc.enable_retries", 1)]
        if self.server_name and self.ca_file is not None:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials:
        assert self.ca_file is not None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.client_key_file.read_bytes() if self.client_key_file else None,
            certificate_chain=self.client_cert_file.read_bytes() if self.client_cert_file else None,
        )


def retry_config(service: str, methods: Sequence[str], max_attempts: int = 4) -> str | None:
    """A service config that retries `methods` of `service` on UNAVAILABLE with exponential backoff (for
    example while a replica warms up or drains)."""
    if not methods:
        return None
    policy = {"maxAttempts": max_attempts, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
              "retryableStatusCodes": ["UNAVAILABLE"]}  # fmt: skip
    names = [{"service": service, "method": method} for method in methods]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


class _Client:
    """What the sync and asyncio bases share: settings, stub, deadline, retry policy."""

    SERVICE: ClassVar[str]  # full proto name, e.g. "wombat.inference.v1.InferenceService"
    STUB: ClassVar[type]  # the generated stub class
    RETRYABLE: ClassVar[tuple[str, ...]] = ()  # idempotent methods retried on UNAVAILABLE
    DEFAULT_TIMEOUT: ClassVar[float | None] = 120.0

    def __init__(self, settings: ChannelSettings | str, *, timeout: float | None | EllipsisType = ...):
        self.settings = ChannelSettings(settings) if isinstance(settings, str) else settings
        # Seconds per call; None: no deadline; left out: the client's DEFAULT_TIMEOUT.
        self.timeout = self.DEFAULT_TIMEOUT if timeout is ... else timeout
        self._channel = self._open(self.settings.options(retry_config(self.SERVICE, self.RETRYABLE)))
        self.stub = self.STUB(self._channel)

    def _open(self, options):
        raise NotImplementedError

    def _call(self, timeout: float | None = None, request_id: str | None = None) -> dict:
        """Keyword arguments of every stub call: its deadline and the call metadata (the token, and the
        caller's request id, which the server logs and echoes)."""
        return {
            "timeout": timeout if timeout is not None else self.timeout,
            "metadata": self.settings.metadata(request_id),
        }


class ServiceClient(_Client):
    """Base of the synchronous clients; use as a context manager or call `close()`."""

    def _open(self, options) -> grpc.Channel:
        if self.settings.ca_file is None:
            return grpc.insecure_channel(self.settings.address, options=options)
        return grpc.secure_channel(self.settings.address, self.settings.credentials(), options=options)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncServiceClient(_Client):
    """Base of the asyncio clients; create inside the event loop, use with `async with`."""

    def _open(self, options) -> grpc.aio.Channel:
        if self.settings.ca_file is None:
            return grpc.aio.insecure_channel(self.settings.address, options=options)
        return grpc.aio.secure_channel(self.settings.address, self.settings.credentials(), options=options)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def error_info(rpc_error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The google.rpc.ErrorInfo a Wombat server attached to a failed call (its `reason` and `metadata`, see
    the protos), or None. Works for sync and asyncio errors alike."""
    try:
        status = rpc_status.from_call(rpc_error)
    except (AttributeError, ValueError):  # not a call, or details that disagree with the status code
        return None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None
