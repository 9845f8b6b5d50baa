"""What every command family shares: common options, failing with a message, client settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, NoReturn, TypeVar

import typer

from services.cli import render
from wombat_core.errors import WombatError

T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object per event")]


def fail(message: str, code: int = 1) -> NoReturn:
    render.console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def client_settings(server: str):
    """How client commands reach a server: the bearer token and TLS files come from the environment
    ($WOMBAT_AUTH_TOKEN, $WOMBAT_TLS_CA_FILE, $WOMBAT_TLS_CERT_FILE, $WOMBAT_TLS_KEY_FILE)."""
    from clients.base import ChannelSettings

    try:
        return ChannelSettings.from_env(server)
    except WombatError as exc:
        fail(exc.message)


def rpc(call: Callable[[], T]) -> T:
    """Runs a client call; a failed RPC ends the command with its status code and message."""
    import grpc

    try:
        return call()
    except grpc.RpcError as exc:
        fail(f"{exc.code().name}: {exc.details()}")


def core(call: Callable[[], T]) -> T:
    """Runs core code in this process; a core error ends the command with its message."""
    try:
        return call()
    except WombatError as exc:
        fail(exc.message)
