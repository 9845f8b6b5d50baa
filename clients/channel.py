"""Channel construction shared by every client: plaintext or TLS (optionally mTLS), bearer token, limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ChannelSettings:
    address: str
    token: str | None = None
    ca_file: Path | None = None  # enables TLS
    client_cert_file: Path | None = None  # mTLS
    client_key_file: Path | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


def channel_options(settings: ChannelSettings, service_config: str | None = None) -> list[tuple[str, object]]:
    """`service_config` is a gRPC service config JSON, used for per-method retry policies."""
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    if service_config:
        options += [("grpc.service_config", service_config), ("grpc.enable_retries", 1)]
    return options


def credentials(settings: ChannelSettings) -> grpc.ChannelCredentials:
    assert settings.ca_file is not None
    return grpc.ssl_channel_credentials(
        root_certificates=settings.ca_file.read_bytes(),
        private_key=settings.client_key_file.read_bytes() if settings.client_key_file else None,
        certificate_chain=settings.client_cert_file.read_bytes() if settings.client_cert_file else None,
    )


def open_channel(settings: ChannelSettings, service_config: str | None = None) -> grpc.Channel:
    options = channel_options(settings, service_config)
    if settings.ca_file is None:
        return grpc.insecure_channel(settings.address, options=options)
    return grpc.secure_channel(settings.address, credentials(settings), options=options)


def open_aio_channel(settings: ChannelSettings, service_config: str | None = None) -> grpc.aio.Channel:
    options = channel_options(settings, service_config)
    if settings.ca_file is None:
        return grpc.aio.insecure_channel(settings.address, options=options)
    return grpc.aio.secure_channel(settings.address, credentials(settings), options=options)


def call_metadata(settings: ChannelSettings, request_id: str | None = None) -> list[tuple[str, str]]:
    metadata = []
    if settings.token:
        metadata.append(("authorization", f"Bearer {settings.token}"))
    if request_id:
        metadata.append(("x-request-id", request_id))
    return metadata
