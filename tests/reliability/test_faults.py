"""Faults: callers that vanish or run out of time, a full disk and a forbidden directory. (Process faults,
SIGTERM and SIGKILL, are in test_process_faults.py; a killed Ray worker and a restarted rrhf service in
test_training_faults.py.)"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time

import grpc
import pytest

from clients.base import ChannelSettings
from clients.inference import InferenceClient, prompt, sampling
from clients.materializer import MaterializerClient
from services.stack import ServiceProcess
from tests.conftest import ServerThread, rpc_error
from tests.engine_fixtures import save_servable_tiny_model
from tests.models import derive_finetuned, save_tiny_llama

LONG = sampling(temperature=0, max_new_tokens=4000, ignore_eos=True)


@pytest.fixture(scope="module")
def inference(tmp_path_factory):
    from services.inference.server import InferenceService, InferenceSettings

    model = save_servable_tiny_model(tmp_path_factory.mktemp("faults") / "tiny-long", context=8192)
    settings = InferenceSettings(model_dir=model, max_batch_size=2, max_queue=4, max_prefill_tokens=256)
    thread = ServerThread(InferenceService(settings))
    yield thread
    thread.stop()


def _wait(predicate, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def _cancelled_count(thread) -> float:
    value = thread.server.registry.get_sample_value(
        "wombat_inference_requests_finished_total", {"reason": "cancelled"}
    )
    return value or 0.0


def test_a_disconnected_stream_frees_its_slot_within_one_decode_step(inference, monkeypatch):
    """From the moment the server learns the caller is gone, the sequence leaves the batch before the
    engine's next decode step (the step already running may finish)."""
    engine = inference.servicer.backend.engine
    cancelled_at: list[int] = []
    removed_at: list[int] = []
    original_cancel, original_apply = engine.cancel, engine._apply_cancellations  # noqa: SLF001

    def cancel(request_id: str) -> None:  # called when the server sees the caller is gone
        cancelled_at.append(engine.stats().decode_steps)
        original_cancel(request_id)

    def apply(ids) -> None:  # the engine drops the sequences from its batch
        removed_at.append(engine.stats().decode_steps)
        original_apply(ids)

    monkeypatch.setattr(engine, "cancel", cancel)
    monkeypatch.setattr(engine, "_apply_cancellations", apply)
    cancelled_before = _cancelled_count(inference)
    with InferenceClient(inference.address, timeout=60) as client:
        survivor = client.generate(prompt("keep going"), LONG)
        next(survivor)  # keeps the engine stepping, so steps can be counted
        doomed = client.generate(prompt("go away"), LONG)
        next(doomed)
        _wait(lambda: engine.stats().running == 2)
        doomed.cancel()  # what a client disconnect looks like to the server
        _wait(lambda: engine.stats().running == 1)
        next(survivor)  # the other stream is unaffected
        survivor.cancel()
    _wait(lambda: engine.stats().running == 0)
    steps = removed_at[0] - cancelled_at[0]
    assert steps <= 1, f"removed {steps} decode steps after the cancel"
    _wait(lambda: _cancelled_count(inference) >= cancelled_before + 2)  # the metrics show both


def test_deadline_during_prefill_frees_the_slot(inference):
    engine = inference.servicer.backend.engine
    saw_prefill = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not saw_prefill.is_set():
            if engine.stats().prefilling:
                saw_prefill.set()
            time.sleep(0.0005)

    long_prompt = prompt("word " * 1400, format="raw")  # ~7000 tokens: ~28 prefill chunks of 256
    # The deadline is a third of what the whole request takes on this machine, so it passes mid-prefill
    # on a fast machine as on a slow one.
    with InferenceClient(inference.address, timeout=60) as client:
        started = time.monotonic()
        client.complete(long_prompt, sampling(max_new_tokens=1))
        whole = time.monotonic() - started
    watcher = threading.Thread(target=watch)
    watcher.start()
    with InferenceClient(inference.address, timeout=whole / 3) as hurried:
        error = rpc_error(lambda: hurried.complete(long_prompt, sampling(max_new_tokens=4)))
    watcher.join()
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert saw_prefill.is_set(), "the deadline should have expired while the prompt was being prefilled"
    _wait(lambda: engine.stats().prefilling == 0 and engine.stats().running == 0, limit=5)


def test_deadline_during_decode_frees_the_slot(inference):
    engine = inference.servicer.backend.engine
    received = []
    with InferenceClient(inference.address, timeout=1.0) as hurried:
        error = rpc_error(lambda: received.extend(hurried.generate(prompt("x"), LONG)))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received, "tokens should have streamed before the deadline"
    _wait(lambda: engine.stats().running == 0, limit=5)
    with InferenceClient(inference.address, timeout=30) as client:
        assert client.complete(prompt("x"), sampling(max_new_tokens=2)).usage.completion_tokens == 2


# --- the materialiser under a full disk and a forbidden directory ----------------------------------------

# Runs `wombat` under OS limits: a file size limit (writes past it fail with EFBIG, like a full disk) and,
# for root, no CAP_DAC_OVERRIDE (so permission bits apply to it as to any user).
LAUNCHER = """
import ctypes, os, resource, signal, sys
limit, drop_dac = int(sys.argv[1]), sys.argv[2] == "1"
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
if drop_dac and os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            sys.exit("cannot drop capabilities")
    os.execv(sys.executable, [sys.executable, "-m", "services.cli", *sys.argv[3:]])
from services.cli.app import app
sys.argv = ["wombat", *sys.argv[3:]]
app()
"""


def _materializer(root, log, *, file_size_limit: int = 0, drop_dac: bool = False) -> ServiceProcess:
    launcher = [sys.executable, "-c", LAUNCHER, str(file_size_limit), "1" if drop_dac else "0"]
    return ServiceProcess(["materializer", "--model-root", str(root), "--port", "0", "--metrics-port", "-1"],
                          log, launcher=launcher)  # fmt: skip


@pytest.fixture
def models(tmp_path):
    root = tmp_path / "models"
    save_tiny_llama(root / "base", seed=1)
    derive_finetuned(root / "base", root / "target", seed=2)
    return root


def _leftovers(root) -> list[str]:
    """Whatever a failed job left, except its (empty, hidden) lock file: partial directories count."""
    from wombat_core.atomic import LOCK_SUFFIX

    return sorted(p.name for p in root.rglob("*") if p.parts[len(root.parts)] not in {"base", "target"}
                  and not p.name.endswith(LOCK_SUFFIX) and p != root / "locked")  # fmt: skip


def test_a_full_disk_is_resource_exhausted_and_leaves_nothing(models, tmp_path):
    weights = (models / "base" / "model.safetensors").stat().st_size
    service = _materializer(models, tmp_path / "log", file_size_limit=weights // 2)
    try:
        with MaterializerClient(ChannelSettings(service.address), timeout=60) as client:
            error = rpc_error(lambda: list(client.make_delta("base", "target", "delta")))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "file size limit" in error.details() or "no space" in error.details()
        assert _leftovers(models) == []
    finally:
        service.stop()


def test_a_forbidden_output_directory_is_permission_denied_and_leaves_nothing(models, tmp_path):
    locked = models / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    service = _materializer(models, tmp_path / "log", drop_dac=True)
    try:
        with MaterializerClient(ChannelSettings(service.address), timeout=60) as client:
            error = rpc_error(lambda: list(client.make_delta("base", "target", "locked/delta")))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
        assert "permissions" in error.details()
        assert _leftovers(models) == []
    finally:
        service.stop()
        os.chmod(locked, 0o755)
        shutil.rmtree(locked)
