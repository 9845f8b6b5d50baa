"""The shared server scaffold: health, reflection, metrics, auth, TLS, request ids, error mapping."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.certs import certificates as _certificates
from tests.conftest import ServerThread, rpc_error
from wombat.materializer.v1 import materializer_pb2 as pb
from wombat.materializer.v1 import materializer_pb2_grpc

TOKEN = "s3cret-token-for-tests-only"


def _start(model_root, *, load: bool = True, **config) -> ServerThread:
    from services.materializer.server import MaterializerService
    from services.scaffold import ServerConfig

    settings = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, **config}
    return ServerThread(MaterializerService(model_root), ServerConfig(**settings), load=load)


def _health(channel, service: str = ""):
    return (
        health_pb2_grpc.HealthStub(channel)
        .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        .status
    )


def test_health_is_not_serving_until_ready_then_serving_then_drains(model_root):
    server = _start(model_root, load=False)
    try:
        with grpc.insecure_channel(server.address) as channel:
            name = "wombat.materializer.v1.MaterializerService"
            assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert _health(channel, name) == health_pb2.HealthCheckResponse.NOT_SERVING
            # Until it is ready, a service's RPCs are refused with UNAVAILABLE: retrying is the fix.
            stub = materializer_pb2_grpc.MaterializerServiceStub(channel)
            early = rpc_error(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5))
            assert early.code() == grpc.StatusCode.UNAVAILABLE and "still loading" in early.details()
            server.load()
            assert _health(channel, name) == health_pb2.HealthCheckResponse.SERVING
            assert list(stub.ListModels(pb.ListModelsRequest(), timeout=5).models) == []
    finally:
        server.stop()
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _health(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_reflection_lists_the_services(materializer):
    with grpc.insecure_channel(materializer.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in next(responses).list_services_response.service}
    assert {"wombat.materializer.v1.MaterializerService", "grpc.health.v1.Health"} <= names


def test_metrics_count_calls_by_method_and_code(materializer, materializer_client):
    materializer_client.list_models()
    rpc_error(lambda: materializer_client.verify("../x"))
    ok = 'wombat_rpc_requests_total{code="OK",method="/wombat.materializer.v1.MaterializerService/ListModels"} 1.0'
    invalid = 'code="INVALID_ARGUMENT",method="/wombat.materializer.v1.MaterializerService/Verify"'
    # A failed call's status reaches the client as the handler aborts, a moment before the server's own
    # bookkeeping for that call runs: poll briefly.
    deadline = time.monotonic() + 5
    while True:
        url = f"http://127.0.0.1:{materializer.server.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        if (ok in body and invalid in body) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert ok in body
    assert invalid in body
    assert "wombat_rpc_duration_seconds_bucket" in body


def test_request_id_is_echoed_and_generated(materializer):
    with grpc.insecure_channel(materializer.address) as channel:
        stub = materializer_pb2_grpc.MaterializerServiceStub(channel)
        _, call = stub.ListModels.with_call(
            pb.ListModelsRequest(), metadata=[("x-request-id", "abc123")], timeout=5
        )
        assert ("x-request-id", "abc123") in call.initial_metadata()
        _, call = stub.ListModels.with_call(pb.ListModelsRequest(), timeout=5)
        assert dict(call.initial_metadata())["x-request-id"]


def test_bearer_token_guards_everything_but_health_and_reflection(model_root, caplog):
    server = _start(model_root, auth_token=TOKEN)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = materializer_pb2_grpc.MaterializerServiceStub(channel)
            for metadata in (
                [],
                [("authorization", "Bearer wrong-token-xxxxxxxx")],
                [("authorization", TOKEN)],
            ):
                error = rpc_error(
                    lambda md=metadata: stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=5)
                )
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            error = rpc_error(lambda: stub.Materialize(pb.MaterializeRequest(), timeout=5))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.ListModels(
                pb.ListModelsRequest(), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=5
            )
            assert list(ok.models) == []
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()
    assert TOKEN not in caplog.text


def test_mutual_tls(model_root, tmp_path):
    from clients.base import ChannelSettings
    from clients.materializer import MaterializerClient
    from services.scaffold import TlsConfig

    certs = _certificates(tmp_path)
    tls = TlsConfig(certs["server_cert"], certs["server_key"], certs["ca"])
    server = _start(model_root, tls=tls, host="localhost")
    address = f"localhost:{server.port}"
    try:
        mtls = ChannelSettings(
            address,
            ca_file=certs["ca"],
            client_cert_file=certs["client_cert"],
            client_key_file=certs["client_key"],
        )
        with MaterializerClient(mtls, timeout=10) as client:
            assert client.list_models() == []
        with MaterializerClient(ChannelSettings(address, ca_file=certs["ca"]), timeout=10) as no_client_cert:
            assert rpc_error(no_client_cert.list_models).code() == grpc.StatusCode.UNAVAILABLE
        with MaterializerClient(ChannelSettings(address), timeout=10) as plaintext:
            assert rpc_error(plaintext.list_models).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_unexpected_errors_become_internal_without_a_traceback(materializer):
    def explode(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    materializer.servicer._in_thread = explode  # noqa: SLF001 - inject a bug
    with grpc.insecure_channel(materializer.address) as channel:
        stub = materializer_pb2_grpc.MaterializerServiceStub(channel)
        error = rpc_error(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.details() and "request id" in error.details()


def test_probe_port_serves_plaintext_health_only_beside_a_tls_port(model_root, tmp_path):
    """Kubernetes' native gRPC probes cannot speak TLS: --health-port gives them a plaintext listener
    that answers grpc.health.v1 and nothing else."""
    from services.scaffold import TlsConfig

    certs = _certificates(tmp_path)
    tls = TlsConfig(certs["server_cert"], certs["server_key"], certs["ca"])
    server = _start(model_root, load=False, tls=tls, host="localhost", health_port=0)
    probe_address = f"localhost:{server.server.health_port}"
    name = "wombat.materializer.v1.MaterializerService"
    try:
        with grpc.insecure_channel(probe_address) as channel:
            assert _health(channel, name) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert _health(channel, "wombat.liveness") == health_pb2.HealthCheckResponse.SERVING
            server.load()
            assert _health(channel, name) == health_pb2.HealthCheckResponse.SERVING
            stub = materializer_pb2_grpc.MaterializerServiceStub(channel)
            error = rpc_error(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5))
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop()


def test_liveness_stays_serving_while_draining(model_root):
    """A drain is not a hang: readiness goes NOT_SERVING, liveness must not, or the kubelet would kill
    the pod before its in-flight streams finish."""
    server = _start(model_root)
    try:
        with grpc.insecure_channel(server.address) as channel:
            server.server._state.draining = True  # noqa: SLF001 - the state stop() enters first
            server.call(server.server.set_serving(False))
            assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert _health(channel, "wombat.liveness") == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()


def test_a_service_that_dies_makes_serve_fail_so_the_process_exits_non_zero(model_root):
    """The lifecycle: a service whose wait_until_failed() returns stops the server at once and `serve()`
    raises ServiceDied, which the CLI turns into a non-zero exit (services/cli/serve.py::_run)."""
    import asyncio

    from services.materializer.server import MaterializerService
    from services.scaffold import ServerConfig, ServiceDied, serve

    class Dying(MaterializerService):
        async def wait_until_failed(self) -> BaseException:
            await asyncio.sleep(0.3)
            return RuntimeError("CUDA error (simulated)")

    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=None)
    started = time.monotonic()
    with pytest.raises(ServiceDied, match="failed while serving: CUDA error"):
        asyncio.run(asyncio.wait_for(serve(config, Dying(model_root)), 20))
    assert time.monotonic() - started < 10
