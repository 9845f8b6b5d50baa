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
    from services.scaffold import ServerConfig

    return ServerConfig(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, **overrides})


def start_materializer(root: Path, **config) -> ServerThread:
    from services.materializer.server import MaterializerService

    return ServerThread(MaterializerService(root), _config(**config))


def start_inference(model: Path, **config) -> ServerThread:
    """The inference service with its engine loaded and warmed up."""
    from services.inference.server import InferenceService, InferenceSettings

    settings = InferenceSettings(model_dir=model, max_batch_size=4, max_queue=16)
    return ServerThread(InferenceService(settings), _config(**config))


def start_rrhf(models: Path, data: Path, **config) -> ServerThread:
    """The rrhf service on this process's Ray cluster (started, and stopped with it, if there was none)."""
    from services.rrhf.server import RrhfService, RrhfSettings

    settings = RrhfSettings(model_root=models, data_root=data, policy_model="policy")
    return ServerThread(RrhfService(settings), _config(**config))


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
        item.thread.stop()
