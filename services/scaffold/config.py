"""Server settings shared by every service."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wombat_core.errors import InvalidArgument

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class TlsConfig:
    """PEM files for TLS. With `client_ca`, clients must present a certificate it signed (mTLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 0  # 0 picks a free port; create_server returns the one bound
    metrics_port: int | None = 0  # None disables the Prometheus endpoint; 0 picks a free port
    metrics_host: str = "0.0.0.0"
    # Plaintext grpc.health.v1-only port for Kubernetes' native gRPC probes (they cannot use TLS).
    # None: health is served on the main port only; 0 picks a free port.
    health_port: int | None = None
    tls: TlsConfig | None = None
    auth_token: str | None = None  # bearer token required on every RPC except health and reflection
    drain_grace_seconds: float = 30.0  # SIGTERM: in-flight RPCs get this long to finish
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_rpcs: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise InvalidArgument(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise InvalidArgument(f"health_port must be in [0, 65535], got {self.health_port}")
        if self.drain_grace_seconds < 0:
            raise InvalidArgument(f"drain_grace_seconds must be >= 0, got {self.drain_grace_seconds}")
        if self.max_message_bytes < 1024:
            raise InvalidArgument(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.auth_token is not None and len(self.auth_token) < 16:
            raise InvalidArgument("auth_token must be at least 16 characters")
