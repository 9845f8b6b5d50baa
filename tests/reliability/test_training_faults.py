"""Training under faults: a Ray worker killed mid-run, and the rrhf service itself killed while a job
runs. A job is never silently lost: it finishes, resumes, or is marked failed with its reason."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from importlib import resources

import grpc
import pytest

from clients.rrhf import RrhfClient
from services.stack import ServiceProcess
from tests.engine_fixtures import save_servable_tiny_model
from wombat.rrhf.v1 import rrhf_pb2 as pb
from wombat_core.rrhf.events import Resumed, StepFinished, WorkerStarted

pytestmark = pytest.mark.slow
HYPER = dict(num_workers=2, max_steps=8, batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-3,
             checkpoint_every_steps=1)  # fmt: skip


def _train(stub, output: str) -> tuple[str, grpc.Call]:
    request = pb.StartTrainingRequest(model_path="policy", data_path="prefs.jsonl", output_path=output,
                                      hyperparameters=pb.TrainingHyperparameters(**HYPER))  # fmt: skip
    job_id = stub.StartTraining(request, timeout=120).job_id
    return job_id, stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=900)


def _final(events) -> pb.Job:
    return [e for e in events if e.HasField("job")][-1].job


def test_killed_worker_resumes_from_its_checkpoint_and_ends_near_an_uninterrupted_run(services):
    from wombat.rrhf.v1 import rrhf_pb2_grpc

    stub = rrhf_pb2_grpc.RrhfServiceStub(services["rrhf"].channel)
    store = services["rrhf"].thread.servicer.store
    _, events = _train(stub, "uninterrupted")
    baseline = _final(events)
    assert baseline.state == pb.JOB_STATE_SUCCEEDED, baseline.error

    job_id, events = _train(stub, "resumed")
    for event in events:
        if event.HasField("step") and event.step.step >= 3:
            break
    victim = next(e.pid for e in store.get(job_id).events if isinstance(e, WorkerStarted) and e.rank == 1)
    os.kill(victim, signal.SIGKILL)
    final = _final(events)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    job = store.get(job_id)
    resumed = [e for e in job.events if isinstance(e, Resumed)]
    assert resumed and 1 <= resumed[0].step <= 4  # from a saved checkpoint, not from scratch
    steps = [e.step for e in job.events if isinstance(e, StepFinished)]
    assert steps[-1] == 8 and set(steps) == set(range(1, 9))
    # Same seed, same data order, optimizer state restored: the loss ends where the baseline's did.
    assert final.latest.loss == pytest.approx(baseline.latest.loss, rel=0.05, abs=0.05)


def test_a_job_of_a_killed_rrhf_service_is_failed_after_restart_then_resumed_by_id(tmp_path):
    models, data = tmp_path / "models", tmp_path / "data"
    save_servable_tiny_model(models / "policy")
    data.mkdir()
    shutil.copyfile(resources.files("wombat_core.rrhf") / "data" / "preferences.jsonl", data / "prefs.jsonl")
    args = ["rrhf", "--model-root", str(models), "--data-root", str(data), "--port", "0", "--metrics-port", "-1",
            "--state-dir", str(tmp_path / "jobs")]  # fmt: skip
    service = ServiceProcess(args, tmp_path / "first.log")
    try:
        with RrhfClient(service.address, timeout=300) as client:
            job_id = client.start_training("policy", "finished-later", data_path="prefs.jsonl", num_workers=1,
                                           epochs=20, max_steps=40, checkpoint_every_steps=1)  # fmt: skip
            for event in client.watch(job_id):
                if event.HasField("checkpoint"):
                    break
            service.process.send_signal(signal.SIGKILL)  # a crash: no drain, no goodbye
            service.process.wait(30)
    finally:
        service.stop()
    restarted = ServiceProcess(args, tmp_path / "second.log")
    try:
        with RrhfClient(restarted.address, timeout=60) as client:
            job = client.get_job(job_id)
            assert job.state == pb.JOB_STATE_FAILED
            assert (
                "restarted while the job was running" in job.error and "last checkpoint at step" in job.error
            )
            assert job_id in [j.job_id for j in client.list_jobs()]
            assert not (models / "finished-later").exists()
            # `wombat train --resume JOB` against the restarted service continues from the last checkpoint.
            result = subprocess.run([sys.executable, "-m", "services.cli", "train", "--resume", job_id, "--server",
                                     restarted.address, "--json"], capture_output=True, text=True, timeout=600)  # fmt: skip
            assert result.returncode == 0, result.stdout + result.stderr
            lines = [json.loads(line) for line in result.stdout.splitlines()]
            assert lines[-1]["event"] == "job" and lines[-1]["job"]["state"] == "JOB_STATE_SUCCEEDED"
            job = client.get_job(job_id)
            assert job.state == pb.JOB_STATE_SUCCEEDED and job.attempts == 2 and job.latest.step == 40
    finally:
        restarted.stop()
    assert (models / "finished-later" / "wombat-manifest.json").is_file()
