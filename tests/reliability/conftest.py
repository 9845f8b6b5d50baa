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


def _materializer(root: Path) -> ServerThread:
    from services.materializer.server import build_server
    from wombat_core.server import ServerConfig

    return ServerThread(lambda: build_server(ServerConfig(host="127.0.0.1", port=0, metrics_port=0), root))


def _inference(model: Path) -> ServerThread:
    from services.inference.server import InferenceSettings, build_server, load_engine
    from wombat_core.server import ServerConfig

    settings = InferenceSettings(model_dir=model, max_batch_size=4, max_queue=16)
    thread = ServerThread(
        lambda: build_server(ServerConfig(host="127.0.0.1", port=0, metrics_port=0), settings), serving=False
    )
    loaded, engine = load_engine(settings)
    thread.servicer.attach(loaded, engine)
    thread.call(thread.server.set_serving(True))
    return thread


def _rrhf(models: Path, data: Path) -> ServerThread:
    from services.rrhf.server import RrhfSettings, build_server
    from wombat_core.server import ServerConfig

    settings = RrhfSettings(model_root=models, data_root=data, policy_model="policy")
    return ServerThread(
        lambda: build_server(ServerConfig(host="127.0.0.1", port=0, metrics_port=0), settings)
    )


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
        "materializer": (_materializer(models), models),
        "inference": (_inference(models / "policy"), models),
        "rrhf": (_rrhf(models, data), models),
    }
    running = {
        name: Running(name, thread, grpc.insecure_channel(thread.address), root)
        for name, (thread, root) in threads.items()
    }
    yield running
    for item in running.values():
        item.channel.close()
    running["rrhf"].thread.call(running["rrhf"].thread.servicer.close())
    for item in running.values():
        item.thread.stop()
    running["inference"].thread.servicer.engine.stop()
    import ray

    ray.shutdown()
