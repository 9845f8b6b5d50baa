"""The three services in this process on real gRPC ports (tiny models, a local Ray cluster), shared by
the reliability tests of this package."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import grpc
import pytest

from tests.conftest import ServerThread
from tests.engine_fixtures import save_servable_tiny_model
from tests.models import derive_finetuned, save_tiny_llama


@dataclass
class Running:
    name: str
    thread: ServerThread
    channel: grpc.Channel
    root: Path  # what the service's paths are relative to


def _config(**overrides):
    from wombat_core.server import ServerConfig

    return ServerConfig(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, **overrides})


def start_materializer(root: Path, **config) -> ServerThread:
    from services.materializer.server import build_server

    return ServerThread(lambda: build_server(_config(**config), root))


def start_inference(model: Path, **config) -> ServerThread:
    """The inference service with its engine loaded; stop with stop_inference."""
    from services.inference.server import InferenceSettings, build_server, load_engine

    settings = InferenceSettings(model_dir=model, max_batch_size=4, max_queue=16)
    thread = ServerThread(lambda: build_server(_config(**config), settings), serving=False)
    loaded, engine = load_engine(settings)
    thread.servicer.attach(loaded, engine)
    thread.call(thread.server.set_serving(True))
    return thread


def stop_inference(thread: ServerThread) -> None:
    thread.stop()
    thread.servicer.engine.stop()


def start_rrhf(models: Path, data: Path, **config) -> ServerThread:
    """The rrhf service on this process's Ray cluster (started if needed); stop with stop_rrhf."""
    from services.rrhf.server import RrhfSettings, build_server

    settings = RrhfSettings(model_root=models, data_root=data, policy_model="policy")
    return ServerThread(lambda: build_server(_config(**config), settings))


def stop_rrhf(thread: ServerThread) -> None:
    thread.call(thread.servicer.close())
    thread.stop()


@pytest.fixture(scope="package")
def services(tmp_path_factory) -> dict[str, Running]:
    base = tmp_path_factory.mktemp("reliability")
    models, data = base / "models", base / "data"
    save_tiny_llama(models / "base", seed=1)
    derive_finetuned(models / "base", models / "target", seed=2)
    save_servable_tiny_model(models / "policy")
    data.mkdir()
    shutil.copyfile(resources.files("wombat_core.rrhf") / "data" / "preferences.jsonl", data / "prefs.jsonl")
    threads = {
        "materializer": (start_materializer(models), models),
        "inference": (start_inference(models / "policy"), models),
        "rrhf": (start_rrhf(models, data), models),
    }
    running = {
        name: Running(name, thread, grpc.insecure_channel(thread.address), root)
        for name, (thread, root) in threads.items()
    }
    yield running
    for item in running.values():
        item.channel.close()
    stop_rrhf(running["rrhf"].thread)
    stop_inference(running["inference"].thread)
    running["materializer"].thread.stop()
    import ray

    ray.shutdown()
