"""Conversions between materialiser protos and wombat_core objects (no logic beyond mapping)."""

from __future__ import annotations

from wombat.common.v1 import common_pb2
from wombat.materializer.v1 import materializer_pb2 as pb
from wombat_core.catalog import ModelSummary
from wombat_core.checkpoint.layout import WeightFormat
from wombat_core.delta import DeltaOptions, JobOutcome
from wombat_core.dtypes import dtype_from_name
from wombat_core.errors import InvalidArgument
from wombat_core.jobs import Progress
from wombat_core.manifest import Manifest, VerifyReport

_FORMATS = {
    WeightFormat.SAFETENSORS: pb.WEIGHT_FORMAT_SAFETENSORS,
    WeightFormat.PYTORCH_BIN: pb.WEIGHT_FORMAT_PYTORCH_BIN,
}
_FILE_STATUS = {
    "ok": pb.FILE_CHECK_STATUS_OK,
    "mismatch": pb.FILE_CHECK_STATUS_MISMATCH,
    "missing": pb.FILE_CHECK_STATUS_MISSING,
    "unexpected": pb.FILE_CHECK_STATUS_UNEXPECTED,
}


def delta_options(message: pb.DeltaOptions) -> DeltaOptions:
    """Unset fields keep DeltaOptions' defaults (the reference's: float16, [PAD] rows padded)."""
    if message.dtype not in common_pb2.Dtype.values():
        raise InvalidArgument(f"options.dtype {message.dtype} is not a known Dtype value")
    values = {}
    if message.dtype != common_pb2.DTYPE_UNSPECIFIED:
        name = common_pb2.Dtype.Name(message.dtype).removeprefix("DTYPE_").lower()
        values["dtype"] = dtype_from_name(name, field="options.dtype")
    if message.HasField("pad_vocab"):
        values["pad_vocab"] = message.pad_vocab
    return DeltaOptions(**values)


def progress(p: Progress) -> common_pb2.Progress:
    message = common_pb2.Progress(
        tensors_done=p.tensors_done,
        tensors_total=p.tensors_total,
        bytes_done=p.bytes_done,
        bytes_total=p.bytes_total,
        current_shard=p.current_shard,
        elapsed_seconds=p.elapsed_seconds,
    )
    if p.eta_seconds is not None:
        message.eta_seconds = p.eta_seconds
    return message


def manifest(m: Manifest) -> common_pb2.Manifest:
    return common_pb2.Manifest(
        format=m.format,
        kind=m.kind,
        created_at=m.created_at,
        tool_version=m.tool_version,
        inputs=[common_pb2.InputFingerprint(role=i.role, path=i.path, sha256=i.sha256) for i in m.inputs],
        options=dict(m.options),
        files=[common_pb2.FileDigest(path=f.path, size_bytes=f.size_bytes, sha256=f.sha256) for f in m.files],
    )


def job_result(outcome: JobOutcome, display_path: str) -> pb.JobResult:
    return pb.JobResult(
        path=display_path,
        manifest=manifest(outcome.manifest),
        already_materialized=outcome.already_materialized,
        elapsed_seconds=outcome.elapsed_seconds,
        inexact_elements=outcome.inexact_elements,
    )


def verify_response(report: VerifyReport) -> pb.VerifyResponse:
    return pb.VerifyResponse(
        ok=report.ok,
        files=[
            pb.FileCheck(
                path=c.path,
                status=_FILE_STATUS[c.status],
                expected_sha256=c.expected_sha256,
                actual_sha256=c.actual_sha256,
            )
            for c in report.files
        ],
        bytes_checked=report.bytes_checked,
        manifest=manifest(report.manifest),
    )


def model_summary(s: ModelSummary) -> pb.ModelSummary:
    message = pb.ModelSummary(
        path=s.path,
        format=_FORMATS[s.format],
        shard_count=s.shard_count,
        tensor_count=s.tensor_count,
        weight_bytes=s.weight_bytes,
        dtypes=list(s.dtypes),
        model_type=s.model_type,
        vocab_size=s.vocab_size,
    )
    if s.manifest is not None:
        message.manifest.CopyFrom(manifest(s.manifest))
    return message
