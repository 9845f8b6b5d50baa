"""The materialiser as a real process: SIGKILL mid-write leaves no target; SIGTERM drains in-flight jobs."""

from __future__ import annotations

import shutil
import signal

import grpc
import pytest

from clients.materializer import MaterializerClient
from wombat.materializer.v1 import materializer_pb2 as pb
from wombat_core.atomic import PARTIAL_MARK
from wombat_core.manifest import verify_directory

pytestmark = pytest.mark.slow
FP32 = pb.DeltaOptions(dtype=3)  # float32 keeps the job long (and the delta exact)


def _partials(root):
    return [p for p in root.rglob("*") if PARTIAL_MARK in p.name]


def test_sigkill_mid_materialise_leaves_no_target_and_a_rerun_succeeds(medium_models, start_materializer):
    root = medium_models
    shutil.rmtree(root / "crash-delta", ignore_errors=True)
    service = start_materializer(root)
    with MaterializerClient(f"127.0.0.1:{service.port}", timeout=120) as client:
        stream = client.make_delta("base", "target", "crash-delta", FP32)
        first = next(stream)
        assert first.progress.tensors_done < first.progress.tensors_total
        service.process.send_signal(signal.SIGKILL)
        service.process.wait(10)
        with pytest.raises(grpc.RpcError):
            list(stream)
    assert not (root / "crash-delta").exists()

    service = start_materializer(root)
    with MaterializerClient(f"127.0.0.1:{service.port}", timeout=120) as client:
        result = list(client.make_delta("base", "target", "crash-delta", FP32))[-1].result
        assert not result.already_materialized
        assert client.verify("crash-delta").ok
    assert verify_directory(root / "crash-delta").ok
    assert not _partials(root)  # the killed job's leftovers were cleaned up by the rerun


def test_sigterm_lets_the_running_job_finish_and_refuses_new_calls(medium_models, start_materializer):
    root = medium_models
    shutil.rmtree(root / "drain-delta", ignore_errors=True)
    service = start_materializer(root, "--drain-seconds", "60")
    with MaterializerClient(f"127.0.0.1:{service.port}", timeout=120) as client:
        stream = client.make_delta("base", "target", "drain-delta", FP32)
        next(stream)
        service.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as refused:
            for _ in range(200):  # until the server has started draining
                client.list_models()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        events = list(stream)
    assert events[-1].HasField("result")
    assert service.process.wait(60) == 0
    assert verify_directory(root / "drain-delta").ok


def test_inference_sigterm_finishes_streams_and_refuses_new_calls(tmp_path):
    from clients.inference import InferenceClient, prompt, sampling
    from services.stack import ServiceProcess
    from tests.engine_fixtures import save_servable_tiny_model
    from wombat.inference.v1 import inference_pb2

    model = save_servable_tiny_model(tmp_path / "tiny", context=8192)
    service = ServiceProcess(["inference", "--model", str(model), "--port", "0", "--metrics-port", "-1",
                              "--drain-seconds", "60"], tmp_path / "inference.log")  # fmt: skip
    try:
        with InferenceClient(f"127.0.0.1:{service.port}", timeout=120) as client:
            stream = client.generate(
                prompt("x"), sampling(temperature=0, max_new_tokens=1500, ignore_eos=True)
            )
            first = next(stream)
            service.process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as refused:
                for _ in range(500):
                    client.tokenize(prompt("y"))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            responses = list(stream)
        assert responses[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        assert len(first.token_ids) + sum(len(r.token_ids) for r in responses) == 1500
        assert service.process.wait(60) == 0
    finally:
        service.stop()


def test_sigterm_exits_within_the_grace_period_even_if_a_stream_would_run_longer(tmp_path):
    import time

    from clients.inference import InferenceClient, prompt, sampling
    from services.stack import ServiceProcess
    from tests.engine_fixtures import save_servable_tiny_model

    model = save_servable_tiny_model(tmp_path / "tiny", context=8192)
    grace = 1.0
    service = ServiceProcess(["inference", "--model", str(model), "--port", "0", "--metrics-port", "-1",
                              "--drain-seconds", str(grace)], tmp_path / "inference.log")  # fmt: skip
    try:
        with InferenceClient(service.address, timeout=120) as client:
            stream = client.generate(prompt("x"), sampling(max_new_tokens=4000, ignore_eos=True))
            next(stream)
            stopped = time.monotonic()
            service.process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError):
                list(stream)  # cut off when the grace period ends
            assert service.process.wait(30) == 0
            assert time.monotonic() - stopped < grace + 5.0
    finally:
        service.stop()
