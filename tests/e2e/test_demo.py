"""`wombat demo` end to end on the real SmolLM2-135M weights (the same flow `make demo` runs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wombat_core.checkpoint.layout import Checkpoint
from wombat_core.manifest import verify_directory

pytestmark = pytest.mark.slow


def test_demo_recovers_the_finetuned_model_bit_for_bit_and_serves_it(demo_workdir):
    tmp_path = demo_workdir
    result = subprocess.run(
        [sys.executable, "-m", "wombat_core.cli.main", "demo", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bit-identical" in result.stderr
    assert "### Response:" in result.stderr and "serve + generate" in result.stderr
    models = tmp_path / "models"
    base = Checkpoint.open(models / "smollm2-135m")
    recovered = Checkpoint.open(models / "smollm2-135m-recovered")
    # SmolLM2's 49152-token vocabulary plus the [PAD] row, exactly as a Wombat delta expects.
    embed = "model.embed_tokens.weight"
    assert recovered.tensors[embed].shape[0] == base.tensors[embed].shape[0] + 1 == 49153
    assert verify_directory(models / "smollm2-135m-recovered").ok
    assert verify_directory(models / "smollm2-135m-delta").ok
