"""Synchronous client for the materialiser service.

Streaming jobs are not retried: they write files, and a retry after a lost connection could race the
first attempt. Their outcome is idempotent on the server, though: repeating a finished Materialize
returns `already_materialized` at once, so callers may safely re-issue the same request themselves.
Unary read-only calls (Verify, Describe, ListModels) are retried on UNAVAILABLE by gRPC's retry policy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from clients.channel import ChannelSettings, call_metadata, open_channel
from wombat.common.v1 import common_pb2
from wombat.materializer.v1 import materializer_pb2 as pb
from wombat.materializer.v1 import materializer_pb2_grpc

_READ_ONLY_RETRY = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "wombat.materializer.v1.MaterializerService", "method": m}
                    for m in ("Verify", "Describe", "ListModels")
                ],  # fmt: skip
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


class MaterializerClient:
    def __init__(self, settings: ChannelSettings | str, *, timeout: float | None = None):
        self.settings = ChannelSettings(settings) if isinstance(settings, str) else settings
        self._channel = open_channel(self.settings, _READ_ONLY_RETRY)
        self._stub = materializer_pb2_grpc.MaterializerServiceStub(self._channel)
        self.timeout = timeout  # deadline per call, seconds; None waits as long as the job takes

    def _md(self) -> list[tuple[str, str]]:
        return call_metadata(self.settings)

    def materialize(
        self, base: str, delta: str, target: str, options: pb.DeltaOptions | None = None
    ) -> Iterator[pb.MaterializeResponse]:
        request = pb.MaterializeRequest(base_path=base, delta_path=delta, target_path=target, options=options)
        return self._stub.Materialize(request, timeout=self.timeout, metadata=self._md())

    def make_delta(
        self, base: str, target: str, delta: str, options: pb.DeltaOptions | None = None
    ) -> Iterator[pb.MakeDeltaResponse]:
        request = pb.MakeDeltaRequest(base_path=base, target_path=target, delta_path=delta, options=options)
        return self._stub.MakeDelta(request, timeout=self.timeout, metadata=self._md())

    def convert(self, source: str, output: str) -> Iterator[pb.ConvertResponse]:
        request = pb.ConvertRequest(source_path=source, output_path=output)
        return self._stub.Convert(request, timeout=self.timeout, metadata=self._md())

    def verify(self, path: str) -> pb.VerifyResponse:
        return self._stub.Verify(pb.VerifyRequest(path=path), timeout=self.timeout, metadata=self._md())

    def describe(self, path: str) -> pb.ModelSummary:
        return self._stub.Describe(
            pb.DescribeRequest(path=path), timeout=self.timeout, metadata=self._md()
        ).model

    def list_models(self, prefix: str = "") -> list[pb.ModelSummary]:
        response = self._stub.ListModels(
            pb.ListModelsRequest(prefix=prefix), timeout=self.timeout, metadata=self._md()
        )
        return list(response.models)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MaterializerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dtype_option(name: str) -> int:
    return {
        "float16": common_pb2.DTYPE_FLOAT16,
        "bfloat16": common_pb2.DTYPE_BFLOAT16,
        "float32": common_pb2.DTYPE_FLOAT32,
    }[name]
