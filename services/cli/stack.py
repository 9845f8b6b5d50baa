"""`wombat up` and `wombat down`: the services of one stack config as local processes, like pods."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from services import stack
from services.cli import render
from services.cli.common import core, fail
from services.cli.serve import check_serve_options

app = typer.Typer()

StackConfigOpt = Annotated[Path, typer.Option("--config", help="stack TOML: a table per service")]


@app.command()
def up(
    config: StackConfigOpt = Path("wombat.toml"),
    run_dir: Annotated[
        Path | None, typer.Option(help="state and logs (default: .wombat beside the config)")
    ] = None,
    detach: Annotated[bool, typer.Option(help="start in the background and return when ready")] = False,
) -> None:
    """Run the services of a stack config as separate local processes, like pods. Ctrl-C or `wombat down`
    drains and stops them."""
    specs = core(lambda: stack.load_stack_config(config, check=check_serve_options))
    run_dir = run_dir or config.resolve().parent / ".wombat"
    if (state := stack.read_state(run_dir)) and stack.supervisor_alive(state):
        fail(f"a stack is already running from {run_dir}; `wombat down --config {config}` stops it")
    if detach:
        sys.exit(_up_detached(config, run_dir))
    _up_foreground(specs, run_dir)


def _up_foreground(specs, run_dir: Path) -> None:
    from rich.table import Table

    def terminate(signum, frame):
        raise KeyboardInterrupt  # SIGTERM (wombat down) stops the stack like Ctrl-C

    signal.signal(signal.SIGTERM, terminate)
    failed = None
    try:
        with stack.LocalStack(specs, run_dir) as services:
            core(lambda: services.start(
                on_ready=lambda p: render.console.print(f"[green]ready[/green] {p.name} on {p.address}")
            ))  # fmt: skip
            table = Table(title="wombat up")
            for column in ("service", "gRPC", "metrics", "log"):
                table.add_column(column)
            for name, process in services.processes.items():
                table.add_row(
                    name, process.address, f"127.0.0.1:{process.metrics_port}", str(process.log_path)
                )
            render.console.print(table)
            render.console.print("Ctrl-C or `wombat down` stops the stack")
            failed = services.wait_for_exit()
            render.console.print(
                f"[red]{failed.name} exited ({failed.process.returncode}):[/red]\n{failed.log_tail()}"
            )
    except KeyboardInterrupt:
        render.console.print("stopping: every service drains its in-flight calls")
    raise typer.Exit(1 if failed else 0)


def _up_detached(config: Path, run_dir: Path) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "up.log", "w") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", stack.PROCESS_MARKER, "up", "--config", str(config), "--run-dir", str(run_dir)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    while supervisor.poll() is None:
        state = stack.read_state(run_dir)
        if state and state["ready"] and state["supervisor_pid"] == supervisor.pid:
            for name, service in state["services"].items():
                render.console.print(
                    f"[green]ready[/green] {name} on {service['address']} (log {service['log']})"
                )
            return 0
        time.sleep(0.2)
    render.console.print(f"[red]the stack failed to start:[/red]\n{(run_dir / 'up.log').read_text()[-3000:]}")
    return 1


@app.command()
def down(
    config: StackConfigOpt = Path("wombat.toml"),
    run_dir: Annotated[Path | None, typer.Option(help="as given to `wombat up`")] = None,
) -> None:
    """Stop the stack `wombat up` started from this config (each service drains first)."""
    run_dir = run_dir or config.resolve().parent / ".wombat"
    stopped = core(lambda: stack.stop_stack(run_dir))
    render.console.print(f"stopped: {', '.join(stopped)}")
