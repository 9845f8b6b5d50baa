"""A stack of services as local processes, like pods: `wombat up`, `wombat down` and `make demo`.

Each service runs as `wombat serve <service> ...` in its own process session (so a terminal's Ctrl-C
reaches only the supervisor, which then drains every service with SIGTERM, like the kubelet), logs to
`<run dir>/logs/<service>.log`, and is ready when it prints its WOMBAT_READY line. The supervisor writes
`<run dir>/stack.json` so `wombat down` can find it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

from services.stack.config import SERVICES, ServiceSpec
from services.stack.process import PROCESS_MARKER, ServiceProcess
from wombat_core.atomic import write_file_atomically
from wombat_core.errors import InvalidArgument, NotFound

STATE_FILE = "stack.json"


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
        write_file_atomically(self.run_dir / STATE_FILE, json.dumps(state, indent=2))

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
