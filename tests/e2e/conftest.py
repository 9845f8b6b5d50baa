from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.models import save_tiny_llama
from wombat_core.cli.stack import ServiceProcess

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


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory) -> Path:
    """A `wombat demo` work directory holding the converted SmolLM2-135M (converted once per session)."""
    from wombat_core.demo_model import prepare_demo_model

    workdir = tmp_path_factory.mktemp("demo")
    prepare_demo_model(workdir / "models" / "smollm2-135m")
    return workdir
