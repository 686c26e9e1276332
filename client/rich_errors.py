"""Field violations of an INVALID_ARGUMENT error, without extra dependencies.

The server sends a `google.rpc.Status` holding a `google.rpc.BadRequest` in the
`grpc-status-details-bin` trailer. Decoding it usually takes googleapis-common-protos;
the client needs only protobuf, so it declares the two messages itself, in a
private descriptor pool (the wire format is all that matters).
"""

from __future__ import annotations

import functools

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

_FIELD = descriptor_pb2.FieldDescriptorProto
_DETAILS_KEY = "grpc-status-details-bin"


@functools.cache
def _messages():
    pool = descriptor_pool.DescriptorPool()
    any_file = descriptor_pb2.FileDescriptorProto()
    any_pb2.DESCRIPTOR.CopyToProto(any_file)
    pool.Add(any_file)
    rpc = descriptor_pb2.FileDescriptorProto(
        name="esm2_service/client/google_rpc.proto",
        package="google.rpc",
        dependency=["google/protobuf/any.proto"],
        syntax="proto3",
    )
    status = rpc.message_type.add(name="Status")
    status.field.add(name="code", number=1, type=_FIELD.TYPE_INT32, label=_FIELD.LABEL_OPTIONAL)
    status.field.add(name="message", number=2, type=_FIELD.TYPE_STRING, label=_FIELD.LABEL_OPTIONAL)
    status.field.add(
        name="details",
        number=3,
        type=_FIELD.TYPE_MESSAGE,
        label=_FIELD.LABEL_REPEATED,
        type_name=".google.protobuf.Any",
    )
    bad_request = rpc.message_type.add(name="BadRequest")
    violation = bad_request.nested_type.add(name="FieldViolation")
    for number, name in ((1, "field"), (2, "description")):
        violation.field.add(
            name=name, number=number, type=_FIELD.TYPE_STRING, label=_FIELD.LABEL_OPTIONAL
        )
    bad_request.field.add(
        name="field_violations",
        number=1,
        type=_FIELD.TYPE_MESSAGE,
        label=_FIELD.LABEL_REPEATED,
        type_name=".google.rpc.BadRequest.FieldViolation",
    )
    pool.Add(rpc)
    find = pool.FindMessageTypeByName
    return (
        message_factory.GetMessageClass(find("google.rpc.Status")),
        message_factory.GetMessageClass(find("google.rpc.BadRequest")),
    )


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """(field, description) of every violation the server reported, e.g.
    ("items[3].sequence", "character 'a' at position 12 is not accepted ...")."""
    trailers = error.trailing_metadata() or () if hasattr(error, "trailing_metadata") else ()
    status_class, bad_request_class = _messages()
    found = []
    for key, value in trailers:
        if key != _DETAILS_KEY:
            continue
        try:
            for detail in status_class.FromString(value).details:
                if detail.type_url.endswith("/google.rpc.BadRequest"):
                    violations = bad_request_class.FromString(detail.value).field_violations
                    found += [(v.field, v.description) for v in violations]
        except DecodeError:
            return []
    return found
