"""The three services as separate local processes, like pods: `wombat up`, `wombat down` and `make demo`.

A stack is described by one TOML file with a table per service; its keys are the options of
`wombat serve <service>` (dashes or underscores), and relative paths are relative to the file:

    [materializer]
    model-root = "models"
    port = 50051

A table left out is a service not started. Each service runs as `wombat serve <service> ...` in its own
process session (so a terminal's Ctrl-C reaches only the supervisor, which then drains every service
with SIGTERM, like the kubelet), logs to `<run dir>/logs/<service>.log`, and is ready when it prints
its WOMBAT_READY line. The supervisor writes `<run dir>/stack.json` so `wombat down` can find it.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import typer

from wombat_core.errors import FailedPrecondition, InvalidArgument, NotFound
from wombat_core.server.scaffold import READY_PATTERN

SERVICES = ("materializer", "rrhf", "inference")  # start order; stopped in reverse
PATH_OPTIONS = {"model", "model_root", "data_root", "state_dir", "tls_cert", "tls_key", "tls_client_ca",
                "auth_token_file"}  # fmt: skip
STATE_FILE = "stack.json"
PROCESS_MARKER = "wombat_core.cli.main"  # in every service's command line; guards against pid reuse


@dataclass(frozen=True)
class ServiceSpec:
    """One service of the stack: its name and the options of `wombat serve <name>`."""

    name: str
    options: dict[str, object] = field(default_factory=dict)

    def argv(self) -> list[str]:
        """The command line after `wombat`: serve <name> --option value ..."""
        args = ["serve", self.name]
        for key, value in self.options.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            else:
                args += [flag, str(value)]
        return args

    @property
    def drain_seconds(self) -> float:
        return float(self.options.get("drain_seconds", 30.0))


def _serve_command(service: str):
    from wombat_core.cli.main import app

    return typer.main.get_command(app).commands["serve"].commands[service]


def check_spec(spec: ServiceSpec) -> None:
    """Parses the spec's command line with the real CLI, so a typo fails here with the option's name."""
    if spec.name not in SERVICES:
        raise InvalidArgument(f"unknown service [{spec.name}]; the services are {', '.join(SERVICES)}")
    command = _serve_command(spec.name)
    known = {p.name for p in command.params}
    unknown = sorted(set(spec.options) - known)
    if unknown:
        raise InvalidArgument(
            f"[{spec.name}] has unknown option(s) {', '.join(unknown)}; see `wombat serve {spec.name} --help`"
        )
    try:
        command.make_context(spec.name, spec.argv()[2:])
    except Exception as exc:  # click's usage errors say which option and why
        raise InvalidArgument(f"[{spec.name}]: {getattr(exc, 'message', exc)}") from exc


def load_stack_config(path: Path) -> dict[str, ServiceSpec]:
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"stack config {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path} is not valid TOML: {exc}") from exc
    specs: dict[str, ServiceSpec] = {}
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise InvalidArgument(f"{path}: {name!r} must be a table like [materializer]")
        options = {key.replace("-", "_"): value for key, value in table.items()}
        for key in PATH_OPTIONS & set(options):
            options[key] = str((path.parent / str(options[key])).resolve())
        spec = ServiceSpec(name, options)
        check_spec(spec)
        specs[name] = spec
    if not specs:
        raise InvalidArgument(f"{path} names no service; add a [materializer], [inference] or [rrhf] table")
    return specs


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the supervisor dies, even by SIGKILL (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class ServiceFailed(FailedPrecondition):
    pass


class ServiceProcess:
    """A `wombat serve <args>` child process, started and ready when constructed (it printed its
    WOMBAT_READY line); stopped with SIGTERM (a graceful drain), killed if it overstays the drain."""

    def __init__(self, args: list[str], log_path: Path, *, drain_seconds: float = 30.0,
                 ready_timeout: float = 300.0, env: dict[str, str] | None = None,
                 launcher: list[str] | None = None):  # fmt: skip
        """`launcher` replaces `python -m wombat_core.cli.main` (tests run the server under OS limits)."""
        self.name, self.log_path, self.drain_seconds = args[0], Path(log_path), drain_seconds
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [*(launcher or [sys.executable, "-m", PROCESS_MARKER]), "serve", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )
        self.port, self.metrics_port = self._wait_ready(ready_timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = READY_PATTERN.search(self.log_path.read_text(errors="replace"))
            if match:
                return int(match.group(1)), match.group(2)
            if self.process.poll() is not None:
                raise ServiceFailed(
                    f"{self.name} exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        self.stop()
        raise ServiceFailed(f"{self.name} was not ready after {timeout:.0f}s; see {self.log_path}")

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.drain_seconds + 15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class LocalStack:
    """Starts services in order (each ready before the next), stops them in reverse, records them in
    `<run dir>/stack.json`. Use as a context manager so they stop however the block ends."""

    def __init__(self, specs: dict[str, ServiceSpec], run_dir: Path):
        self.specs, self.run_dir = specs, Path(run_dir).resolve()
        self.processes: dict[str, ServiceProcess] = {}

    def start(self, names: Iterable[str] | None = None, on_ready=None) -> None:
        wanted = set(names) if names is not None else set(self.specs)
        for name in (n for n in SERVICES if n in wanted and n not in self.processes):
            if name not in self.specs:
                raise InvalidArgument(f"no [{name}] table in the stack config")
            spec = self.specs[name]
            log = self.run_dir / "logs" / f"{name}.log"
            process = ServiceProcess(spec.argv()[1:], log, drain_seconds=spec.drain_seconds)
            self.processes[name] = process
            self._write_state()
            if on_ready:
                on_ready(process)

    def address(self, name: str) -> str:
        return self.processes[name].address

    def stop(self, names: Iterable[str] | None = None) -> None:
        wanted = set(names) if names is not None else set(self.processes)
        for name in reversed(SERVICES):
            if name in wanted and name in self.processes:
                self.processes.pop(name).stop()
        self._write_state()

    def wait_for_exit(self) -> ServiceProcess:
        """Blocks until one service exits on its own and returns it (the caller then stops the rest)."""
        while True:
            for process in self.processes.values():
                if process.process.poll() is not None:
                    return process
            time.sleep(0.5)

    def _write_state(self) -> None:
        state = {
            "supervisor_pid": os.getpid(),
            "services": {
                name: {
                    "pid": p.process.pid,
                    "address": p.address,
                    "metrics_port": p.metrics_port,
                    "log": str(p.log_path),
                }  # fmt: skip
                for name, p in self.processes.items()
            },
            "ready": sorted(self.processes) == sorted(self.specs),
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.run_dir / f".{STATE_FILE}.tmp"
        temporary.write_text(json.dumps(state, indent=2))
        temporary.replace(self.run_dir / STATE_FILE)

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)


def read_state(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / STATE_FILE).read_text())
    except FileNotFoundError:
        return None


def _ours(pid: int) -> psutil.Process | None:
    """The process with this pid, if it is still one of ours (pids get reused)."""
    try:
        process = psutil.Process(pid)
        ours = any(PROCESS_MARKER in part or Path(part).name == "wombat" for part in process.cmdline())
        return process if ours else None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def stop_stack(run_dir: Path, timeout: float = 90.0) -> list[str]:
    """`wombat down`: asks the supervisor to stop (it drains every service), then stops any service left
    over (a supervisor killed with SIGKILL on a non-Linux host). Returns what was stopped."""
    state = read_state(run_dir)
    if state is None:
        raise NotFound(f"no stack is running from {run_dir} ({STATE_FILE} not found)")
    stopped = []
    supervisor = _ours(state["supervisor_pid"])
    if supervisor is not None and supervisor.pid != os.getpid():
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(timeout)
        except psutil.TimeoutExpired:
            supervisor.kill()
        stopped.append("supervisor")
    for name, service in state["services"].items():
        process = _ours(service["pid"])
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except psutil.TimeoutExpired:
                process.kill()
        stopped.append(name)
    (Path(run_dir) / STATE_FILE).unlink(missing_ok=True)
    return stopped


def supervisor_alive(state: dict) -> bool:
    return _ours(state["supervisor_pid"]) is not None
