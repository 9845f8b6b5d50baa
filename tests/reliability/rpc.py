"""Calling any Wombat RPC by its descriptor, and hypothesis strategies for any request message."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from hypothesis import strategies as st

from wombat.inference.v1 import inference_pb2
from wombat.materializer.v1 import materializer_pb2
from wombat.rrhf.v1 import rrhf_pb2

SERVICES = {
    "materializer": materializer_pb2.DESCRIPTOR.services_by_name["MaterializerService"],
    "inference": inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    "rrhf": rrhf_pb2.DESCRIPTOR.services_by_name["RrhfService"],
}
ALL_RPCS = [(name, method) for name, service in SERVICES.items() for method in service.methods]

# The answers a bad request may get: a status that tells the caller what is wrong with it.
PROPER_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED,
}

# Strings a caller might send: names that exist on the servers, paths that try to escape, odd text.
INTERESTING_STRINGS = ["", "policy", "base", "target", "prefs.jsonl", "../base", "/etc/passwd", "base/../..",
                       "a\x00b", "nonexistent/dir", "🐨" * 500, "x" * 100_000, " ", "\n", "alpaca", "chat"]  # fmt: skip
HUGE_REPEATED = 20_000

_INTEGER_RANGES = {
    d.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    d.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    d.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def message_class(descriptor: d.Descriptor):
    return message_factory.GetMessageClass(descriptor)


def _scalar(field: d.FieldDescriptor, depth: int) -> st.SearchStrategy:
    kind = field.type
    if kind == d.FieldDescriptor.TYPE_STRING:
        return st.text(max_size=40) | st.sampled_from(INTERESTING_STRINGS)
    if kind == d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)  # any bytes, invalid UTF-8 included
    if kind == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (d.FieldDescriptor.TYPE_FLOAT, d.FieldDescriptor.TYPE_DOUBLE):
        width = 32 if kind == d.FieldDescriptor.TYPE_FLOAT else 64
        return st.floats(width=width) | st.sampled_from([0.0, -1.0, 1e30, float("nan"), float("inf")])
    if kind == d.FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 40)  # proto3 enums are open: unknown numbers arrive as they are
    if kind == d.FieldDescriptor.TYPE_MESSAGE:
        return message_strategy(field.message_type, depth + 1)
    low, high = _INTEGER_RANGES[kind]
    edges = [v for v in (0, 1, -1, high, low) if low <= v <= high]  # -1 only for signed fields
    return st.integers(low, high) | st.sampled_from(edges)


def _fixed_value(field: d.FieldDescriptor):
    if field.type == d.FieldDescriptor.TYPE_STRING:
        return "x"
    if field.type == d.FieldDescriptor.TYPE_MESSAGE:
        return message_class(field.message_type)()
    return 1


def _is_map(field: d.FieldDescriptor) -> bool:
    return field.type == d.FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _field(field: d.FieldDescriptor, depth: int) -> st.SearchStrategy:
    if _is_map(field):  # map<K, V>: a dict, a few random entries or very many
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        few = st.dictionaries(_scalar(key, depth), _scalar(value, depth), max_size=4)
        huge = st.just(HUGE_REPEATED).map(lambda n: {i: _fixed_value(value) for i in range(n)})
        return few | huge
    if field.is_repeated:
        few = st.lists(_scalar(field, depth), max_size=4)
        huge = st.just(HUGE_REPEATED).map(lambda n: [_fixed_value(field)] * n)
        return few | huge
    return _scalar(field, depth)


def message_strategy(descriptor: d.Descriptor, depth: int = 0) -> st.SearchStrategy:
    """Random messages of this type: every field unset or set to any value its type allows."""
    if depth > 2:
        return st.just(message_class(descriptor)())
    fields = {f.name: st.none() | _field(f, depth) for f in descriptor.fields}

    def build(values: dict):
        message = message_class(descriptor)()
        for name, value in values.items():
            if value is None:
                continue
            field = descriptor.fields_by_name[name]
            if _is_map(field):
                getattr(message, name).update(value)
            elif field.is_repeated:
                getattr(message, name).extend(value)
            elif field.type == d.FieldDescriptor.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries(fields).map(build)


def invoke(
    channel: grpc.Channel, method: d.MethodDescriptor, request, timeout: float = 60
) -> tuple[grpc.StatusCode, object]:
    """Calls the RPC; a stream is read for three messages and then cancelled (a generation may be long).
    Returns the status code and the first response (or None)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    decode = message_class(method.output_type).FromString
    try:
        if method.server_streaming:
            call = channel.unary_stream(path, request_serializer=_serialize, response_deserializer=decode)(
                request, timeout=timeout
            )
            first = None
            for count, response in enumerate(call, start=1):
                first = first or response
                if count >= 3:
                    call.cancel()
                    break
            return grpc.StatusCode.OK, first
        call = channel.unary_unary(path, request_serializer=_serialize, response_deserializer=decode)
        return grpc.StatusCode.OK, call(request, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def _serialize(message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()
