from wombat.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FileCheckStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILE_CHECK_STATUS_UNSPECIFIED: _ClassVar[FileCheckStatus]
    FILE_CHECK_STATUS_OK: _ClassVar[FileCheckStatus]
    FILE_CHECK_STATUS_MISMATCH: _ClassVar[FileCheckStatus]
    FILE_CHECK_STATUS_MISSING: _ClassVar[FileCheckStatus]
    FILE_CHECK_STATUS_UNEXPECTED: _ClassVar[FileCheckStatus]

class WeightFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHT_FORMAT_UNSPECIFIED: _ClassVar[WeightFormat]
    WEIGHT_FORMAT_SAFETENSORS: _ClassVar[WeightFormat]
    WEIGHT_FORMAT_PYTORCH_BIN: _ClassVar[WeightFormat]
FILE_CHECK_STATUS_UNSPECIFIED: FileCheckStatus
FILE_CHECK_STATUS_OK: FileCheckStatus
FILE_CHECK_STATUS_MISMATCH: FileCheckStatus
FILE_CHECK_STATUS_MISSING: FileCheckStatus
FILE_CHECK_STATUS_UNEXPECTED: FileCheckStatus
WEIGHT_FORMAT_UNSPECIFIED: WeightFormat
WEIGHT_FORMAT_SAFETENSORS: WeightFormat
WEIGHT_FORMAT_PYTORCH_BIN: WeightFormat

class DeltaOptions(_message.Message):
    __slots__ = ("dtype", "pad_vocab", "max_shard_bytes")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PAD_VOCAB_FIELD_NUMBER: _ClassVar[int]
    MAX_SHARD_BYTES_FIELD_NUMBER: _ClassVar[int]
    dtype: _common_pb2.Dtype
    pad_vocab: bool
    max_shard_bytes: int
    def __init__(self, dtype: _Optional[_Union[_common_pb2.Dtype, str]] = ..., pad_vocab: _Optional[bool] = ..., max_shard_bytes: _Optional[int] = ...) -> None: ...

class MaterializeRequest(_message.Message):
    __slots__ = ("base_path", "delta_path", "target_path", "options")
    BASE_PATH_FIELD_NUMBER: _ClassVar[int]
    DELTA_PATH_FIELD_NUMBER: _ClassVar[int]
    TARGET_PATH_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    base_path: str
    delta_path: str
    target_path: str
    options: DeltaOptions
    def __init__(self, base_path: _Optional[str] = ..., delta_path: _Optional[str] = ..., target_path: _Optional[str] = ..., options: _Optional[_Union[DeltaOptions, _Mapping]] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("path", "manifest", "already_materialized", "elapsed_seconds", "inexact_elements")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ALREADY_MATERIALIZED_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INEXACT_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    path: str
    manifest: _common_pb2.Manifest
    already_materialized: bool
    elapsed_seconds: float
    inexact_elements: int
    def __init__(self, path: _Optional[str] = ..., manifest: _Optional[_Union[_common_pb2.Manifest, _Mapping]] = ..., already_materialized: _Optional[bool] = ..., elapsed_seconds: _Optional[float] = ..., inexact_elements: _Optional[int] = ...) -> None: ...

class MaterializeResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    result: JobResult
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ...) -> None: ...

class MakeDeltaRequest(_message.Message):
    __slots__ = ("base_path", "target_path", "delta_path", "options")
    BASE_PATH_FIELD_NUMBER: _ClassVar[int]
    TARGET_PATH_FIELD_NUMBER: _ClassVar[int]
    DELTA_PATH_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    base_path: str
    target_path: str
    delta_path: str
    options: DeltaOptions
    def __init__(self, base_path: _Optional[str] = ..., target_path: _Optional[str] = ..., delta_path: _Optional[str] = ..., options: _Optional[_Union[DeltaOptions, _Mapping]] = ...) -> None: ...

class MakeDeltaResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    result: JobResult
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ...) -> None: ...

class ConvertRequest(_message.Message):
    __slots__ = ("source_path", "output_path")
    SOURCE_PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    source_path: str
    output_path: str
    def __init__(self, source_path: _Optional[str] = ..., output_path: _Optional[str] = ...) -> None: ...

class ConvertResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    result: JobResult
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class FileCheck(_message.Message):
    __slots__ = ("path", "status", "expected_sha256", "actual_sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SHA256_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    status: FileCheckStatus
    expected_sha256: str
    actual_sha256: str
    def __init__(self, path: _Optional[str] = ..., status: _Optional[_Union[FileCheckStatus, str]] = ..., expected_sha256: _Optional[str] = ..., actual_sha256: _Optional[str] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("ok", "files", "bytes_checked", "manifest")
    OK_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_CHECKED_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    files: _containers.RepeatedCompositeFieldContainer[FileCheck]
    bytes_checked: int
    manifest: _common_pb2.Manifest
    def __init__(self, ok: _Optional[bool] = ..., files: _Optional[_Iterable[_Union[FileCheck, _Mapping]]] = ..., bytes_checked: _Optional[int] = ..., manifest: _Optional[_Union[_common_pb2.Manifest, _Mapping]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("path", "format", "shard_count", "tensor_count", "weight_bytes", "dtypes", "model_type", "vocab_size", "manifest")
    PATH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    path: str
    format: WeightFormat
    shard_count: int
    tensor_count: int
    weight_bytes: int
    dtypes: _containers.RepeatedScalarFieldContainer[str]
    model_type: str
    vocab_size: int
    manifest: _common_pb2.Manifest
    def __init__(self, path: _Optional[str] = ..., format: _Optional[_Union[WeightFormat, str]] = ..., shard_count: _Optional[int] = ..., tensor_count: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., dtypes: _Optional[_Iterable[str]] = ..., model_type: _Optional[str] = ..., vocab_size: _Optional[int] = ..., manifest: _Optional[_Union[_common_pb2.Manifest, _Mapping]] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelSummary
    def __init__(self, model: _Optional[_Union[ModelSummary, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("prefix",)
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    def __init__(self, prefix: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...
