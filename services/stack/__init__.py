"""Process supervision for a stack of Wombat services: configs, child processes, the local stack."""

from services.stack.config import SERVICES, ServiceSpec, load_stack_config
from services.stack.local import LocalStack, read_state, stop_stack, supervisor_alive
from services.stack.process import PROCESS_MARKER, ServiceFailed, ServiceProcess

__all__ = [
    "PROCESS_MARKER",
    "SERVICES",
    "LocalStack",
    "ServiceFailed",
    "ServiceProcess",
    "ServiceSpec",
    "load_stack_config",
    "read_state",
    "stop_stack",
    "supervisor_alive",
]
