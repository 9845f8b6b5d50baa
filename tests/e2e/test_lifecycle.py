"""The `make demo` lifecycle, shortened: train -> delta -> materialise -> verify -> serve -> rank, with the
three services as separate processes."""

from __future__ import annotations

import pytest

from services.cli.demo import run_lifecycle
from services.stack import read_state

pytestmark = pytest.mark.slow


def test_shortened_lifecycle_recovers_the_trained_model_and_streams_an_answer(demo_workdir, tmp_path):
    workdir = tmp_path / "lifecycle"
    base = demo_workdir / "models" / "smollm2-135m"
    result = run_lifecycle(workdir, base_dir=base, train_steps=2, workers=1, max_new_tokens=24)
    assert [name for name, _, _ in result.stages] == [
        "prepare base", "start services", "rrhf train", "make delta", "materialise", "verify",
        "serve + stream", "openai sdk via gateway", "rank",
    ]  # fmt: skip
    assert result.manifest_ok and result.differences == []
    assert result.trained_digest == result.recovered_digest
    assert result.answer.strip()
    assert result.gateway_answer == result.answer  # the openai SDK through the gateway: the same text
    assert result.ok
    assert read_state(workdir) is None  # every service stopped, the stack record removed
