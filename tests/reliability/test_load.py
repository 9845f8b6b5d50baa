"""Load: many more concurrent calls than a server admits. Every call ends OK or RESOURCE_EXHAUSTED (never
INTERNAL or UNKNOWN, never a hang), the server's memory stays flat over rounds, and it serves normally
afterwards."""

from __future__ import annotations

import shutil
from importlib import resources

import grpc
import pytest

from clients.inference import InferenceClient, prompt, sampling
from clients.rrhf import RrhfClient
from services.stack import ServiceProcess
from tests.engine_fixtures import save_servable_tiny_model
from tests.reliability.load import generate_round, score_round

pytestmark = pytest.mark.slow

ROUNDS = 3
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _check_rounds(rounds, calls: int) -> None:
    for number, result in enumerate(rounds, start=1):
        assert set(result.codes) <= ALLOWED, f"round {number}: {dict(result.codes)}"
        assert sum(result.codes.values()) == calls
        assert result.codes[grpc.StatusCode.OK] > 0 and result.codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > 0
    growth = rounds[-1].rss_bytes / rounds[0].rss_bytes
    assert growth <= 1.10, f"RSS grew {growth:.2f}x over {len(rounds)} rounds"


def test_64_generate_streams_against_a_queue_of_16(tmp_path):
    model = save_servable_tiny_model(tmp_path / "tiny")
    service = ServiceProcess(["inference", "--model", str(model), "--port", "0", "--metrics-port", "-1",
                              "--max-batch-size", "4", "--max-queue", "16"], tmp_path / "inference.log")  # fmt: skip
    try:
        rounds = [generate_round(service.address, service.process.pid, streams=64) for _ in range(ROUNDS)]
        _check_rounds(rounds, 64)
        for result in rounds:  # admitted: the batch and the queue, at least
            assert result.codes[grpc.StatusCode.OK] >= 4 + 16
        with InferenceClient(service.address, timeout=60) as client:
            answer = client.complete(prompt("Still there?"), sampling(temperature=0, max_new_tokens=8))
        assert answer.usage.completion_tokens == 8
    finally:
        service.stop()


def test_64_score_calls_against_a_limit_of_4(tmp_path):
    models, data = tmp_path / "models", tmp_path / "data"
    save_servable_tiny_model(models / "policy")
    data.mkdir()
    shutil.copyfile(resources.files("wombat_core.rrhf") / "data" / "preferences.jsonl", data / "prefs.jsonl")
    service = ServiceProcess(["rrhf", "--model-root", str(models), "--data-root", str(data), "--port", "0",
                              "--metrics-port", "-1", "--policy-model", "policy", "--max-pending-scores", "4"],
                             tmp_path / "rrhf.log")  # fmt: skip
    try:
        with RrhfClient(service.address, timeout=120) as client:
            client.score("warm up", ["a", "b"])  # loads the scorer actor before the rounds
        rounds = [score_round(service.address, service.process.pid, callers=64) for _ in range(ROUNDS)]
        _check_rounds(rounds, 64)
        with RrhfClient(service.address, timeout=60) as client:
            assert len(client.score("Still there?", ["Yes.", "No."]).scores) == 2
    finally:
        service.stop()
