from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory) -> Path:
    """A `wombat demo` work directory holding the converted SmolLM2-135M (converted once per session)."""
    from wombat_core.demo_model import prepare_demo_model

    workdir = tmp_path_factory.mktemp("demo")
    prepare_demo_model(workdir / "models" / "smollm2-135m")
    return workdir
