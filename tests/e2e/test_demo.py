"""`wombat demo` (what `make demo` runs) cleans up its service processes when it is interrupted. The
lifecycle itself is covered, shortened, by test_lifecycle.py."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from services.stack import read_state
from tests.conftest import interruptible

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_stops_every_service(demo_workdir, tmp_path, sig):
    workdir = tmp_path / "demo"
    (workdir / "models").mkdir(parents=True)
    shutil.copytree(demo_workdir / "models" / "smollm2-135m", workdir / "models" / "smollm2-135m")
    demo = subprocess.Popen([sys.executable, "-m", "services.cli", "demo", "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=interruptible)  # fmt: skip
    deadline, state = time.monotonic() + 300, None
    while time.monotonic() < deadline and demo.poll() is None:
        state = read_state(workdir)
        if state and {"materializer", "rrhf"} <= set(state["services"]):
            break
        time.sleep(0.2)
    assert state and demo.poll() is None, demo.communicate()[0][-3000:]
    pids = [service["pid"] for service in state["services"].values()]
    demo.send_signal(sig)
    output, _ = demo.communicate(timeout=120)
    assert demo.returncode == 130, output[-3000:]
    assert "interrupted" in output
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert read_state(workdir) is None
