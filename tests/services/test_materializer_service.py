"""MaterializerService over real gRPC on localhost: results, progress, and a status code for each bad input."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from clients.base import error_info
from tests.conftest import rpc_error
from tests.models import load_state, naive_apply, save_tiny_llama
from wombat.materializer.v1 import materializer_pb2 as pb
from wombat_core.atomic import PARTIAL_MARK
from wombat_core.delta import make_delta


@pytest.fixture
def with_delta(tiny_models):
    make_delta(tiny_models / "base", tiny_models / "target", tiny_models / "delta")
    return tiny_models


def test_materialize_streams_progress_then_the_manifest(with_delta, materializer_client):
    events = list(materializer_client.materialize("base", "delta", "out"))
    assert all(e.HasField("progress") for e in events[:-1]) and events[-1].HasField("result")
    progress = [e.progress for e in events[:-1]]
    assert progress[-1].tensors_done == progress[-1].tensors_total > 0
    assert progress[-1].bytes_done == progress[-1].bytes_total
    result = events[-1].result
    assert result.path == "out" and not result.already_materialized
    assert {f.path for f in result.manifest.files} >= {"model.safetensors", "config.json"}
    assert [i.role for i in result.manifest.inputs] == ["base", "delta"]
    expected = naive_apply(load_state(with_delta / "base"), load_state(with_delta / "delta"))
    actual = load_state(with_delta / "out")
    assert all(torch.equal(actual[k], expected[k]) for k in expected)

    again = list(materializer_client.materialize("base", "delta", "out"))
    assert len(again) == 1 and again[0].result.already_materialized


def test_make_delta_verify_describe_and_list(tiny_models, materializer_client):
    result = list(materializer_client.make_delta("base", "target", "deltas/d1"))[-1].result
    assert result.inexact_elements == 0 and result.manifest.kind == "make-delta"
    verified = materializer_client.verify("deltas/d1")
    assert verified.ok and verified.bytes_checked > 0
    assert all(f.status == pb.FILE_CHECK_STATUS_OK for f in verified.files)

    summary = materializer_client.describe("deltas/d1")
    assert summary.format == pb.WEIGHT_FORMAT_SAFETENSORS and summary.vocab_size == 33
    assert list(summary.dtypes) == ["float16"] and summary.HasField("manifest")
    listed = [m.path for m in materializer_client.list_models()]
    assert listed == ["base", "deltas/d1", "target"]
    assert [m.path for m in materializer_client.list_models("deltas")] == ["deltas/d1"]


def test_verify_reports_tampering(with_delta, materializer_client):
    list(materializer_client.materialize("base", "delta", "out"))
    config = with_delta / "out" / "config.json"
    config.write_text(config.read_text() + " ")
    response = materializer_client.verify("out")
    assert not response.ok
    assert {f.path: f.status for f in response.files}["config.json"] == pb.FILE_CHECK_STATUS_MISMATCH


def _code(client_call) -> tuple[grpc.StatusCode, str]:
    error = rpc_error(client_call)
    return error.code(), error.details()


def test_missing_base_is_not_found(with_delta, materializer_client):
    code, details = _code(lambda: materializer_client.materialize("no-such-base", "delta", "out"))
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-base" in details


@pytest.mark.parametrize("bad", ["../outside", "/etc", "a/../../b", ""])
def test_malformed_paths_are_invalid_argument(with_delta, materializer_client, bad):
    code, details = _code(lambda: materializer_client.materialize(bad, "delta", "out"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "base_path" in details


def test_symlink_out_of_the_root_is_permission_denied(with_delta, materializer_client, tmp_path):
    outside = tmp_path / "outside-model"
    shutil.copytree(with_delta / "base", outside)
    (with_delta / "sneaky").symlink_to(outside)
    code, details = _code(lambda: materializer_client.materialize("sneaky", "delta", "out"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "outside the model root" in details
    code, _ = _code(lambda: materializer_client.verify("sneaky"))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def _edit_delta(root, change):
    path = root / "delta" / "model.safetensors"
    state = load_file(path)
    change(state)
    path.unlink()
    save_file(state, path)


def test_missing_tensor_is_invalid_argument_with_error_info(with_delta, materializer_client):
    _edit_delta(with_delta, lambda s: s.pop("model.norm.weight"))
    error = rpc_error(lambda: materializer_client.materialize("base", "delta", "out"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "model.norm.weight" in error.details()
    info = error_info(error)
    assert (
        info is not None
        and info.reason == "TENSOR_MISMATCH"
        and info.metadata["tensor"] == "model.norm.weight"
    )
    assert not (with_delta / "out").exists()


def test_shape_mismatch_is_invalid_argument(with_delta, materializer_client):
    _edit_delta(with_delta, lambda s: s.update({"model.norm.weight": torch.zeros(8, dtype=torch.float16)}))
    code, details = _code(lambda: materializer_client.materialize("base", "delta", "out"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "tensor model.norm.weight: base shape [16] vs delta shape [8]"


def test_vocab_mismatch_without_padding_explains_the_fix(with_delta, materializer_client):
    error = rpc_error(
        lambda: materializer_client.materialize("base", "delta", "out", pb.DeltaOptions(pad_vocab=False))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "VOCAB_MISMATCH" and "[PAD]" in error.details()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_invalid_argument(with_delta, materializer_client, damage):
    path = with_delta / "delta" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(
        data[: len(data) // 2] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"
    )
    error = rpc_error(lambda: materializer_client.materialize("base", "delta", "out"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model.safetensors is not a valid safetensors file" in error.details()
    assert not (with_delta / "out").exists()


def test_pickle_offered_as_safetensors_is_invalid_argument(with_delta, materializer_client):
    path = with_delta / "delta" / "model.safetensors"
    state = load_file(path)
    path.unlink()
    torch.save(state, path)
    error = rpc_error(lambda: materializer_client.materialize("base", "delta", "out"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "PICKLE_NOT_SAFETENSORS" and "wombat convert" in error.details()


def test_target_with_another_manifest_is_already_exists(with_delta, materializer_client):
    list(materializer_client.make_delta("base", "target", "other"))
    code, details = _code(lambda: materializer_client.materialize("base", "delta", "other"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "other inputs" in details
    (with_delta / "plain").mkdir()
    code, details = _code(lambda: materializer_client.materialize("base", "delta", "plain"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "not written by wombat" in details


def test_verify_without_manifest_is_failed_precondition(with_delta, materializer_client):
    code, details = _code(lambda: materializer_client.verify("base"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "wombat-manifest.json" in details
    code, _ = _code(lambda: materializer_client.describe("missing"))
    assert code == grpc.StatusCode.NOT_FOUND


@pytest.fixture
def big_models(model_root):
    """~60 MB in 3 shards of many tensors: slow enough to cancel mid-job."""
    overrides = dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    save_tiny_llama(
        model_root / "base", seed=1, dtype=torch.float32, max_shard_size="20MB", config_overrides=overrides
    )
    save_tiny_llama(
        model_root / "target", seed=2, dtype=torch.float32, max_shard_size="20MB", config_overrides=overrides
    )
    return model_root


def test_client_cancellation_stops_the_job_and_leaves_no_output(
    big_models, materializer, materializer_client
):
    def running() -> float:
        return materializer.server.registry.get_sample_value("wombat_materializer_jobs_running")

    stream = materializer_client.make_delta("base", "target", "delta", pb.DeltaOptions(dtype=3))
    first = next(stream)
    assert first.HasField("progress") and first.progress.tensors_done < first.progress.tensors_total
    assert running() == 1
    stream.cancel()
    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() == 0
    assert not (big_models / "delta").exists()
    assert not [p for p in big_models.iterdir() if PARTIAL_MARK in p.name]
    # The slot is free again and a rerun completes.
    assert list(materializer_client.make_delta("base", "target", "delta"))[-1].HasField("result")


def test_deadline_exceeded_also_cleans_up(big_models, materializer_client):
    from clients.materializer import MaterializerClient

    # The deadline is a third of what the same job takes on this machine, so it passes mid-job on a fast
    # machine as on a slow one.
    started = time.monotonic()
    list(materializer_client.make_delta("base", "target", "timed", pb.DeltaOptions(dtype=3)))
    whole = time.monotonic() - started
    with MaterializerClient(materializer_client.settings, timeout=whole / 3) as hurried:
        error = rpc_error(lambda: hurried.make_delta("base", "target", "delta", pb.DeltaOptions(dtype=3)))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 30
    while [p for p in big_models.iterdir() if PARTIAL_MARK in p.name] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (big_models / "delta").exists()
    assert not [p for p in big_models.iterdir() if PARTIAL_MARK in p.name]


def test_too_many_concurrent_jobs_is_resource_exhausted(big_models, materializer, materializer_client):
    streams = [
        materializer_client.make_delta("base", "target", f"d{i}", pb.DeltaOptions(dtype=3)) for i in range(2)
    ]
    for stream in streams:
        next(stream)  # both jobs are running: the default limit is 2
    code, details = _code(lambda: materializer_client.make_delta("base", "target", "d3"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in details
    for stream in streams:
        assert list(stream)[-1].HasField("result")


def test_same_target_twice_at_once_is_aborted(big_models, materializer_client):
    first = materializer_client.make_delta("base", "target", "same", pb.DeltaOptions(dtype=3))
    next(first)
    code, details = _code(
        lambda: materializer_client.make_delta("base", "target", "same", pb.DeltaOptions(dtype=3))
    )
    assert code == grpc.StatusCode.ABORTED and "already writing" in details
    assert list(first)[-1].HasField("result")
    assert threading.active_count() < 50
