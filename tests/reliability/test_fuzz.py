"""Bad input, fuzzed: random values in every field of every RPC's request, huge strings and repeated
fields, bytes that are not a message at all, and strings that are not UTF-8. Every answer must be a
proper status (never INTERNAL or UNKNOWN) and every server must still serve afterwards."""

from __future__ import annotations

import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings

from tests.reliability.rpc import ALL_RPCS, PROPER_CODES, invoke, message_strategy
from wombat.rrhf.v1 import rrhf_pb2

EXAMPLES = int(os.environ.get("WOMBAT_FUZZ_EXAMPLES", "25"))  # per RPC; benchmarks/reliability.py sets more
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.function_scoped_fixture])  # fmt: skip


def _cancel_started_jobs(services, response) -> None:
    """A fuzzed request that happens to be valid may start a job; stop it so the next examples run."""
    job_id = getattr(response, "job_id", "")
    if job_id:
        stub = services["rrhf"].channel.unary_unary(
            "/wombat.rrhf.v1.RrhfService/CancelJob",
            request_serializer=rrhf_pb2.CancelJobRequest.SerializeToString,
            response_deserializer=rrhf_pb2.CancelJobResponse.FromString,
        )
        stub(rrhf_pb2.CancelJobRequest(job_id=job_id), timeout=60)


def _assert_healthy(services) -> None:
    for running in services.values():
        status = health_pb2_grpc.HealthStub(running.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING, running.name


@pytest.mark.parametrize(("service", "method"), ALL_RPCS, ids=[f"{s}.{m.name}" for s, m in ALL_RPCS])
def test_random_requests_get_proper_statuses(services, service, method):
    seen: dict[grpc.StatusCode, int] = {}

    @FUZZ_SETTINGS
    @given(request=message_strategy(method.input_type))
    def check(request):
        code, response = invoke(services[service].channel, method, request)
        seen[code] = seen.get(code, 0) + 1
        assert code in PROPER_CODES, f"{method.full_name} answered {code.name}: {response}"
        if code == grpc.StatusCode.OK:
            _cancel_started_jobs(services, response)

    check()
    _assert_healthy(services)
    assert seen  # (a request without fields has a single example)


# Raw bytes on the wire: not a message at all, truncated, and a string field (number 1 in every request
# that has one) holding bytes that are not UTF-8.
NOT_A_MESSAGE = [b"\xff\xff\xff\xff", b"\x0a\x10abc", b"\x0a\x02\xff\xfe", b"\x0a\x04\xc3\x28\xa0\xa1"]


@pytest.mark.parametrize(("service", "method"), ALL_RPCS, ids=[f"{s}.{m.name}" for s, m in ALL_RPCS])
def test_undecodable_bytes_are_invalid_argument(services, service, method):
    for raw in NOT_A_MESSAGE:
        code, details = invoke(services[service].channel, method, raw)
        if code == grpc.StatusCode.OK:
            continue  # these bytes happen to parse as this message (field 1 is not a string here)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method.full_name, raw, code, details)
    _assert_healthy(services)
