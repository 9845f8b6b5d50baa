"""The one gRPC server scaffold every Wombat service runs on (transport only; no domain logic here)."""

from wombat_core.server.config import ServerConfig, TlsConfig
from wombat_core.server.scaffold import ServiceRegistration, WombatServer, create_server, run_until_signalled

__all__ = [
    "ServerConfig",
    "ServiceRegistration",
    "TlsConfig",
    "WombatServer",
    "create_server",
    "run_until_signalled",
]
