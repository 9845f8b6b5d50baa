"""One service as a child process: `wombat serve <service> ...` in its own session, ready once it prints
its WOMBAT_READY line, stopped with SIGTERM (a graceful drain) and killed if it overstays the drain.
`wombat up`, the demo, the benchmarks and the process tests all supervise services through this."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.scaffold.server import READY_PATTERN
from wombat_core.errors import FailedPrecondition

# The CLI's module: in every service's command line, so `wombat down` can tell a reused pid from ours.
PROCESS_MARKER = "services.cli"


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
        """`launcher` replaces `python -m services.cli` (tests run the server under OS limits)."""
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
