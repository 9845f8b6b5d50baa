"""Shared fixtures: tiny real checkpoints on disk and real gRPC servers on port 0."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from services.stack import ServiceProcess
from tests.models import derive_finetuned, save_tiny_llama


def interruptible() -> None:
    """preexec_fn for a child that a test interrupts with SIGINT: a shell that runs `make test` in the
    background without job control starts it with SIGINT ignored, and Python keeps an inherited SIG_IGN
    (no KeyboardInterrupt), which is not what a user at a terminal has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ServerThread:
    """Runs a Wombat service through the scaffold's lifecycle (`start_service`) on its own event loop in a
    background thread, for sync test code. With `load=False` it listens but is still NOT_SERVING."""

    def __init__(self, service, config=None, *, load: bool = True):
        from services.scaffold import ServerConfig, start_service

        self.service = service
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = config or ServerConfig(host="127.0.0.1", port=0, metrics_port=0)
        self.server, self.port = self.call(start_service(config, service, load=load))
        self.address = f"127.0.0.1:{self.port}"

    @property
    def servicer(self):
        return self.service.servicer

    def load(self) -> None:
        """The rest of the lifecycle's start for a server built with `load=False`."""
        self.call(self.service.load())
        self.call(self.server.set_serving(True))
        self.call(self._watch())

    async def _watch(self) -> None:
        self.server.watch_for_failure(self.service.wait_until_failed())

    def call(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float = 0) -> None:
        """Drains and stops the server, then closes the service (as the lifecycle does)."""
        self.call(self.server.stop(grace))
        self.call(self.service.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def model_root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root


@pytest.fixture
def tiny_models(model_root: Path) -> Path:
    """base (vocab 32), target (vocab 33, the [PAD] row added), both float16; returns the root."""
    save_tiny_llama(model_root / "base", seed=1, max_shard_size="5KB")
    derive_finetuned(model_root / "base", model_root / "target", seed=2)
    return model_root


@pytest.fixture
def materializer(model_root: Path) -> Iterator[ServerThread]:
    from services.materializer.server import MaterializerService

    server = ServerThread(MaterializerService(model_root))
    yield server
    server.stop()


@pytest.fixture
def materializer_client(materializer: ServerThread):
    from clients.materializer import MaterializerClient

    with MaterializerClient(materializer.address, timeout=60) as client:
        yield client


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """Runs `call` (consuming a stream fully) and returns the RpcError it must raise."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__"):
            list(result)
    return info.value


torch.set_num_threads(1)  # tiny models; avoids oversubscribing the 2-core CI machine


# ~200 MB fp32 per checkpoint in 4 shards: big enough that a job is still running when we interrupt it.
MEDIUM = dict(
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    num_key_value_heads=8,
)


@pytest.fixture(scope="module")
def medium_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("medium") / "models"
    root.mkdir()
    for name, seed in (("base", 1), ("target", 2)):
        save_tiny_llama(
            root / name, seed=seed, dtype=torch.float32, max_shard_size="60MB", config_overrides=MEDIUM
        )
    return root


@pytest.fixture
def start_materializer(tmp_path):
    started: list[ServiceProcess] = []

    def start(model_root: Path, *extra: str) -> ServiceProcess:
        service = ServiceProcess(
            ["materializer", "--model-root", str(model_root), "--port", "0", "--metrics-port", "-1", *extra],
            tmp_path / f"server-{len(started)}.log",
        )
        started.append(service)
        return service

    yield start
    for service in started:
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait()
        service.stop()
