"""Security on every service: TLS and mutual TLS, the bearer token (health and reflection stay open,
tokens never logged), message-size limits both ways, and pickles that must never run."""

from __future__ import annotations

import pickle
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.certs import certificates
from tests.malicious import CreatesFileWhenUnpickled
from tests.reliability.conftest import (
    start_inference,
    start_materializer,
    start_rrhf,
)
from tests.reliability.rpc import SERVICES, invoke
from wombat.inference.v1 import inference_pb2 as ipb
from wombat.materializer.v1 import materializer_pb2 as mpb
from wombat.rrhf.v1 import rrhf_pb2 as rpb

TOKEN = "reliability-token-0123456789abcdef"

# A cheap call per service that only an authenticated caller may make.
PROBES = {
    "materializer": ("ListModels", mpb.ListModelsRequest()),
    "inference": ("ModelInfo", ipb.ModelInfoRequest()),
    "rrhf": ("ListJobs", rpb.ListJobsRequest()),
}


def _start(name: str, services, **config):
    root = services["materializer"].root
    if name == "materializer":
        return start_materializer(root, **config)
    if name == "inference":
        return start_inference(root / "policy", **config)
    data = Path(services["rrhf"].thread.servicer.data.root)
    return start_rrhf(root, data, **config)


def _call(channel, service: str, token: str | None):
    method_name, request = PROBES[service]
    method = SERVICES[service].methods_by_name[method_name]
    path = f"/{method.containing_service.full_name}/{method.name}"
    metadata = [("authorization", f"Bearer {token}")] if token else []
    stub = channel.unary_unary(
        path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=None
    )
    try:
        stub(request, metadata=metadata, timeout=30)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def _tls_channel(address: str, certs: dict, client_cert: bool) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs["ca"].read_bytes(),
        private_key=certs["client_key"].read_bytes() if client_cert else None,
        certificate_chain=certs["client_cert"].read_bytes() if client_cert else None,
    )
    return grpc.secure_channel(address, credentials)


@pytest.mark.parametrize("service", ["materializer", "inference", "rrhf"])
def test_mutual_tls_and_bearer_token(services, tmp_path, caplog, service):
    from services.scaffold import TlsConfig

    certs = certificates(tmp_path)
    tls = TlsConfig(certs["server_cert"], certs["server_key"], certs["ca"])
    thread = _start(service, services, tls=tls, auth_token=TOKEN, host="localhost")
    address = f"localhost:{thread.port}"
    try:
        with _tls_channel(address, certs, client_cert=True) as channel:
            assert _call(channel, service, TOKEN) == grpc.StatusCode.OK
            assert _call(channel, service, None) == grpc.StatusCode.UNAUTHENTICATED
            assert _call(channel, service, "wrong-token-0123456789") == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # open without a token
            listing = reflection_pb2.ServerReflectionRequest(list_services="")
            reply = next(
                reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([listing]))
            )
            assert SERVICES[service].full_name in {s.name for s in reply.list_services_response.service}
        with _tls_channel(address, certs, client_cert=False) as no_certificate:
            assert _call(no_certificate, service, TOKEN) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(address) as plaintext:
            assert _call(plaintext, service, TOKEN) == grpc.StatusCode.UNAVAILABLE
    finally:
        thread.stop()
    assert TOKEN not in caplog.text


def test_responses_over_the_send_limit_are_resource_exhausted(services):
    thread = _start("inference", services, max_message_bytes=64 * 1024)
    try:
        with grpc.insecure_channel(thread.address) as channel:
            tokenize = SERVICES["inference"].methods_by_name["Tokenize"]
            small = ipb.TokenizeRequest(
                prompt=ipb.PromptInput(format=ipb.PROMPT_FORMAT_RAW, text="word " * 10)
            )
            assert invoke(channel, tokenize, small)[0] == grpc.StatusCode.OK
            # 40 KB of text in; its tokens, ids and rendered text come back as more than 64 KiB.
            large = ipb.TokenizeRequest(
                prompt=ipb.PromptInput(format=ipb.PROMPT_FORMAT_RAW, text="ab " * 13_000)
            )
            code, details = invoke(channel, tokenize, large)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            too_big = ipb.TokenizeRequest(
                prompt=ipb.PromptInput(format=ipb.PROMPT_FORMAT_RAW, text="x" * 70_000)
            )
            assert invoke(channel, tokenize, too_big)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED  # receive side
    finally:
        thread.stop()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_malicious_bin_offered_as_weights_never_runs(services, tmp_path):
    """A pickle that would create a file if anything fully unpickled it, offered to every RPC that reads
    weights: each refuses it, and the file never appears."""
    root = services["materializer"].root
    marker = tmp_path / "pwned"
    evil = root / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((root / "base" / "config.json").read_text())
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": CreatesFileWhenUnpickled(marker)}, f)
    materializer = SERVICES["materializer"].methods_by_name
    calls = [
        (materializer["Convert"], mpb.ConvertRequest(source_path="evil", output_path="evil-converted")),
        (
            materializer["Materialize"],
            mpb.MaterializeRequest(base_path="base", delta_path="evil", target_path="x"),
        ),
        (
            materializer["MakeDelta"],
            mpb.MakeDeltaRequest(base_path="evil", target_path="target", delta_path="y"),
        ),
    ]
    for method, request in calls:
        code, details = invoke(services["materializer"].channel, method, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method.name, details)
        assert "weights_only=True" in details
    describe = invoke(
        services["materializer"].channel, materializer["Describe"], mpb.DescribeRequest(path="evil")
    )
    assert describe[0] == grpc.StatusCode.OK  # sizes and config only: Describe never loads the pickle
    assert not marker.exists()
    assert not any((root / name).exists() for name in ("evil-converted", "x", "y"))


def test_cli_client_commands_speak_mutual_tls_with_the_token(services, tmp_path):
    from typer.testing import CliRunner

    from services.cli.app import app
    from services.scaffold import TlsConfig

    certs = certificates(tmp_path)
    tls = TlsConfig(certs["server_cert"], certs["server_key"], certs["ca"])
    thread = _start("materializer", services, tls=tls, auth_token=TOKEN, host="localhost")
    server = f"localhost:{thread.port}"
    env = {"WOMBAT_AUTH_TOKEN": TOKEN, "WOMBAT_TLS_CA_FILE": str(certs["ca"]),
           "WOMBAT_TLS_CERT_FILE": str(certs["client_cert"]), "WOMBAT_TLS_KEY_FILE": str(certs["client_key"])}  # fmt: skip
    try:
        reached = CliRunner().invoke(app, ["verify", "--server", server, "no-such-model"], env=env)
        assert reached.exit_code == 1 and "NOT_FOUND" in reached.output  # the server answered the question
        no_tls = CliRunner().invoke(app, ["verify", "--server", server, "no-such-model"],
                                    env={"WOMBAT_AUTH_TOKEN": TOKEN})  # fmt: skip
        assert "UNAVAILABLE" in no_tls.output
        half = CliRunner().invoke(
            app, ["verify", "--server", server, "x"], env={**env, "WOMBAT_TLS_KEY_FILE": ""}
        )
        assert half.exit_code == 1 and "go together" in half.output
    finally:
        thread.stop()
