from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.stack import ServiceProcess


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory) -> Path:
    """A `wombat demo` work directory holding the converted SmolLM2-135M (converted once per session)."""
    from wombat_core.demo_model import prepare_demo_model

    workdir = tmp_path_factory.mktemp("demo")
    prepare_demo_model(workdir / "models" / "smollm2-135m")
    return workdir


@contextlib.contextmanager
def gateway_stack(demo_workdir: Path, logs: Path, *, engine: str = "wombat", batch: int, queue: int,
                  metrics_port: str = "-1", api_key: str | None = None,
                  gateway_args: tuple[str, ...] = ()) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:  # fmt: skip
    """One `wombat serve inference` process on the SmolLM2 demo weights (fp32, CPU, `engine`) and one
    `wombat serve gateway` in front of it, each its own process as in a pod; both stopped on exit."""
    model = demo_workdir / "models" / "smollm2-135m"
    inference = ServiceProcess(["inference", "--model", str(model), "--port", "0", "--metrics-port", metrics_port,
                                "--max-batch-size", str(batch), "--max-queue", str(queue), "--engine", engine,
                                "--dtype", "float32", "--device", "cpu"], logs / "inference.log",
                               ready_timeout=300)  # fmt: skip
    key = ()
    if api_key is not None:
        (logs / "api-key").write_text(api_key)
        key = ("--api-key-file", str(logs / "api-key"))
    try:
        gateway = ServiceProcess(["gateway", "--upstream", inference.address, "--port", "0", *key, *gateway_args],
                                 logs / "gateway.log", ready_timeout=60)  # fmt: skip
    except Exception:
        inference.stop()
        raise
    try:
        yield inference, gateway
    finally:
        gateway.stop()
        inference.stop()


CALLERS_KEY = "callers-key-0123456789"


@pytest.fixture(scope="session")
def callers_stack(demo_workdir, tmp_path_factory):
    """The in-house engine behind a gateway that checks a key and caps bodies at 64 KiB, shared by the
    modules that test what callers send (test_gateway_callers.py, test_real_callers.py): one start."""
    with gateway_stack(demo_workdir, tmp_path_factory.mktemp("callers"), batch=8, queue=64, api_key=CALLERS_KEY,
                       gateway_args=("--max-body-bytes", "65536")) as stack:  # fmt: skip
        yield stack
