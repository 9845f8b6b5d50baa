"""The one gRPC server scaffold every Wombat service runs on, and its one serve lifecycle.

Transport wiring only: it sits above `wombat_core` (which knows nothing of gRPC) and beside the services.
"""

from services.scaffold.config import ServerConfig, TlsConfig
from services.scaffold.lifecycle import Service, ServiceDied, run_until_signalled, serve, start_service
from services.scaffold.server import ServiceRegistration, WombatServer, create_server

__all__ = [
    "ServerConfig",
    "Service",
    "ServiceDied",
    "ServiceRegistration",
    "TlsConfig",
    "WombatServer",
    "create_server",
    "run_until_signalled",
    "serve",
    "start_service",
]
