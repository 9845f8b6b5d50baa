"""Synchronous client for the materialiser service.

Streaming jobs are not retried: they write files, and a retry after a lost connection could race the
first attempt. Their outcome is idempotent on the server, though: repeating a finished Materialize
returns `already_materialized` at once, so callers may safely re-issue the same request themselves.
Unary read-only calls (Verify, Describe, ListModels) are retried on UNAVAILABLE by gRPC's retry policy.
"""

from __future__ import annotations

from collections.abc import Iterator

from clients.base import ServiceClient
from wombat.common.v1 import common_pb2
from wombat.materializer.v1 import materializer_pb2 as pb
from wombat.materializer.v1 import materializer_pb2_grpc
from wombat_core.errors import InvalidArgument


class MaterializerClient(ServiceClient):
    SERVICE = pb.DESCRIPTOR.services_by_name["MaterializerService"].full_name
    STUB = materializer_pb2_grpc.MaterializerServiceStub
    RETRYABLE = ("Verify", "Describe", "ListModels")
    DEFAULT_TIMEOUT = None  # a job takes as long as it takes; pass a timeout to bound it

    def materialize(
        self, base: str, delta: str, target: str, options: pb.DeltaOptions | None = None
    ) -> Iterator[pb.MaterializeResponse]:
        request = pb.MaterializeRequest(base_path=base, delta_path=delta, target_path=target, options=options)
        return self.stub.Materialize(request, **self._call())

    def make_delta(
        self, base: str, target: str, delta: str, options: pb.DeltaOptions | None = None
    ) -> Iterator[pb.MakeDeltaResponse]:
        request = pb.MakeDeltaRequest(base_path=base, target_path=target, delta_path=delta, options=options)
        return self.stub.MakeDelta(request, **self._call())

    def convert(self, source: str, output: str) -> Iterator[pb.ConvertResponse]:
        return self.stub.Convert(pb.ConvertRequest(source_path=source, output_path=output), **self._call())

    def verify(self, path: str) -> pb.VerifyResponse:
        return self.stub.Verify(pb.VerifyRequest(path=path), **self._call())

    def describe(self, path: str) -> pb.ModelSummary:
        return self.stub.Describe(pb.DescribeRequest(path=path), **self._call()).model

    def list_models(self, prefix: str = "") -> list[pb.ModelSummary]:
        return list(self.stub.ListModels(pb.ListModelsRequest(prefix=prefix), **self._call()).models)


def delta_options(dtype: str = "float16", pad_vocab: bool = True) -> pb.DeltaOptions:
    """DeltaOptions with the dtype by name ("float16", "bfloat16", "float32": the proto's Dtype values)."""
    names = [n.removeprefix("DTYPE_").lower() for n in common_pb2.Dtype.keys() if n != "DTYPE_UNSPECIFIED"]
    if dtype not in names:
        raise InvalidArgument(f"dtype must be one of {', '.join(names)}, got {dtype!r}")
    return pb.DeltaOptions(dtype=common_pb2.Dtype.Value("DTYPE_" + dtype.upper()), pad_vocab=pad_vocab)
