"""`wombat up` / `wombat down`: services from one TOML file as separate processes, stopped cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.serve import check_serve_options
from services.stack import load_stack_config, read_state
from tests.conftest import interruptible
from wombat_core.errors import InvalidArgument, NotFound


def _write(tmp_path, text: str):
    path = tmp_path / "stack.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[materialiser]\nmodel-root = 'm'\n", "unknown service [materialiser]"),
        ("[inference]\nmodel = 'm'\nmax-batch = 4\n", "unknown option(s) max_batch"),
        ("[inference]\nmodel = 'm'\nport = 'eighty'\n", "[inference]"),
        ("title = 'x'\n", "must be a table"),
        ("", "names no service"),
        ("[rrhf\n", "not valid TOML"),
    ],
)
def test_bad_stack_configs_say_what_to_fix(tmp_path, text, message):
    """As `wombat up` loads them: every service's options parsed by the real `wombat serve` command."""
    with pytest.raises(InvalidArgument) as info:
        load_stack_config(_write(tmp_path, text), check=check_serve_options)
    assert message in info.value.message


def test_paths_are_relative_to_the_config_file(tmp_path):
    specs = load_stack_config(
        _write(tmp_path, "[rrhf]\nmodel-root = 'models'\ndata-root = '/abs/data'\nport = 0\n")
    )
    argv = specs["rrhf"].argv()
    assert argv[:2] == ["serve", "rrhf"]
    assert argv[argv.index("--model-root") + 1] == str(tmp_path / "models")
    assert argv[argv.index("--data-root") + 1] == "/abs/data"
    with pytest.raises(NotFound):
        load_stack_config(tmp_path / "missing.toml")


def _config(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    return _write(tmp_path, "[materializer]\nmodel-root = 'models'\nport = 0\nmetrics-port = -1\n"
                            "drain-seconds = 5\n")  # fmt: skip


def _wombat(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True,
                          text=True, timeout=120, **kwargs)  # fmt: skip


def _said(result) -> str:
    return " ".join((result.stdout + result.stderr).split())  # the console wraps long lines


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service="wombat.materializer.v1.MaterializerService")
        status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status
    return status == health_pb2.HealthCheckResponse.SERVING


def _gone(pid: int, timeout: float = 30) -> bool:
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_up_detached_then_down(tmp_path):
    config = _config(tmp_path)
    started = _wombat("up", "--config", str(config), "--detach")
    try:
        assert started.returncode == 0, _said(started)
        state = read_state(tmp_path / ".wombat")
        service = state["services"]["materializer"]
        assert state["ready"] and _serving(service["address"])
        again = _wombat("up", "--config", str(config), "--detach")
        assert again.returncode == 1 and "already running" in _said(again)
    finally:
        stopped = _wombat("down", "--config", str(config))
    assert stopped.returncode == 0, _said(stopped)
    assert _gone(service["pid"]) and _gone(state["supervisor_pid"])
    assert read_state(tmp_path / ".wombat") is None
    assert "signal received: draining" in (tmp_path / ".wombat" / "logs" / "materializer.log").read_text()
    nothing = _wombat("down", "--config", str(config))
    assert nothing.returncode == 1 and "no stack is running" in _said(nothing)


def _start_foreground(tmp_path):
    config = _config(tmp_path)
    supervisor = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--config", str(config)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  preexec_fn=interruptible)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = read_state(tmp_path / ".wombat")
        if state and state["ready"]:
            return supervisor, state
        assert supervisor.poll() is None, supervisor.stdout.read()
        time.sleep(0.2)
    pytest.fail("the stack did not become ready")


def test_ctrl_c_drains_and_stops_every_service(tmp_path):
    supervisor, state = _start_foreground(tmp_path)
    supervisor.send_signal(signal.SIGINT)
    try:
        output, _ = supervisor.communicate(timeout=60)
    finally:
        supervisor.kill()  # services follow it (PR_SET_PDEATHSIG) if the test failed
    assert supervisor.returncode == 0, output
    assert _gone(state["services"]["materializer"]["pid"])
    assert read_state(tmp_path / ".wombat") is None


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_services_stop_when_the_supervisor_is_killed(tmp_path):
    supervisor, state = _start_foreground(tmp_path)
    supervisor.kill()
    supervisor.wait()
    assert _gone(state["services"]["materializer"]["pid"])
    stale = json.loads((tmp_path / ".wombat" / "stack.json").read_text())
    assert stale["supervisor_pid"] == supervisor.pid
    restarted = _wombat(
        "up", "--config", str(tmp_path / "stack.toml"), "--detach"
    )  # a stale record is no obstacle
    assert restarted.returncode == 0, _said(restarted)
    assert _wombat("down", "--config", str(tmp_path / "stack.toml")).returncode == 0


def test_the_shipped_stack_config_is_valid():
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "deploy" / "local" / "stack.toml"
    specs = load_stack_config(config, check=check_serve_options)
    assert set(specs) == {"materializer", "inference", "rrhf", "gateway"}
    ports = [spec.options["port"] for spec in specs.values()]
    assert len(set(ports)) == 4 and 0 not in ports  # fixed, distinct: clients need to know them
    # The gateway fronts the stack's own inference service.
    assert specs["gateway"].options["upstream"] == [f"127.0.0.1:{specs['inference'].options['port']}"]
    assert specs["gateway"].argv()[2:4] == ["--upstream", f"127.0.0.1:{specs['inference'].options['port']}"]
