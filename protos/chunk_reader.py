"""Reads a serialized chunk response without copying its tensor bytes.

Protobuf's parser copies a `bytes` field into the message, and reading the field copies it
again, so a tensor decoded the usual way is copied three times between the gRPC buffer and
its numpy array. `read_chunk` walks the wire format of an `EncodeResponse` (or
`PredictResponse`: the same fields) whose payload is a chunk and returns the tensor bytes as
a view into the message. It is the reader for what `tensors.serialized_chunk_responses`
writes, and for any valid encoding of the same fields; for anything else (a completion, a
repeated message field, an unexpected wire type, a malformed message) it returns None and
the caller parses the message with protobuf, which decides. `read_packed` splits a packed
message (EncodePackedResponse, PredictPackedResponse) into views of its responses the same way.
"""

from __future__ import annotations

from typing import NamedTuple

from esm2_service.esm2.v1 import esm2_pb2 as pb

# How each field is read; other fields are skipped, as protobuf skips fields it does
# not know.
_NUMBER, _MESSAGE, _BYTES, _REPEATED_NUMBER = range(4)


def _schema(message, how: dict[str, int]) -> dict[int, tuple[str, int]]:
    """field number -> (name, how it is read), the numbers from esm2.proto's descriptor."""
    fields = message.DESCRIPTOR.fields_by_name
    return {fields[name].number: (name, kind) for name, kind in how.items()}


_RESPONSE = _schema(
    pb.EncodeResponse, {"sequence_index": _NUMBER, "chunk": _MESSAGE, "complete": _MESSAGE}
)
_CHUNK = _schema(
    pb.TensorChunk, {"kind": _NUMBER, "layer": _NUMBER, "tensor": _MESSAGE, "offset": _NUMBER}
)
_TENSOR = _schema(pb.Tensor, {"dtype": _NUMBER, "shape": _REPEATED_NUMBER, "data": _BYTES})
_VARINT, _LENGTH_DELIMITED = 0, 2
_PACKED_RESPONSES = pb.EncodePackedResponse.DESCRIPTOR.fields_by_name["responses"].number
_PACKED_RESPONSE_KEY = _PACKED_RESPONSES << 3 | _LENGTH_DELIMITED
_FIELD_NUMBER_LIMIT = 1 << 29


class ChunkView(NamedTuple):
    sequence_index: int
    kind: int
    layer: int
    offset: int  # of `data` within the whole tensor, in bytes
    dtype: int
    shape: tuple[int, ...]
    data: memoryview  # into the serialized message


class _Unusual(Exception):
    """Not the plain encoding this reader handles: let protobuf parse it."""


def read_chunk(raw: bytes) -> ChunkView | None:
    """The chunk of a serialized response, or None (see the module's docstring)."""
    view = memoryview(raw)
    try:
        response = _fields(view, 0, len(view), _RESPONSE)
        if "complete" in response or "chunk" not in response:  # a completion, or no payload
            return None
        chunk = _fields(view, *response["chunk"], _CHUNK)
        tensor = _fields(view, *chunk.get("tensor", (0, 0)), _TENSOR)
        shape = tuple(_int64(extent) for extent in _shape(view, tensor.get("shape", [])))
    except (_Unusual, IndexError):
        return None
    start, end = tensor.get("data", (0, 0))
    return ChunkView(
        sequence_index=_int32(response.get("sequence_index", 0)),
        kind=_int32(chunk.get("kind", 0)),
        layer=_int32(chunk.get("layer", 0)),
        offset=_int64(chunk.get("offset", 0)),
        dtype=_int32(tensor.get("dtype", 0)),
        shape=shape,
        data=view[start:end],
    )


def read_packed(raw: bytes) -> list[memoryview] | None:
    """The serialized responses of a packed message, as views into it, in order; None for
    anything but the plain encoding (a field other than `responses`, a malformed message)."""
    view = memoryview(raw)
    responses = []
    at, end = 0, len(view)
    try:
        while at < end:
            key, at = _varint(view, at)
            if key != _PACKED_RESPONSE_KEY:
                raise _Unusual
            length, at = _varint(view, at)
            if at + length > end:
                raise _Unusual
            responses.append(view[at : at + length])
            at += length
    except (_Unusual, IndexError):
        return None
    return responses


def _fields(view, start: int, end: int, schema: dict[int, tuple[str, int]]) -> dict:
    """The message in view[start:end]: field name -> a number's value, or a message's
    or bytes' (start, end), or a repeated number's [(wire type, value)]. The last value
    of a field wins, as in protobuf; a message field that occurs twice (protobuf would
    merge them) or a field of an unexpected wire type is unusual."""
    fields: dict = {}
    at = start
    while at < end:
        key, at = _varint(view, at)
        number, wire_type = key >> 3, key & 7
        if not 0 < number < _FIELD_NUMBER_LIMIT:  # protobuf refuses these
            raise _Unusual
        if wire_type == _VARINT:
            value, at = _varint(view, at)
        elif wire_type == _LENGTH_DELIMITED:
            length, at = _varint(view, at)
            value, at = (at, at + length), at + length
        else:
            raise _Unusual
        if number not in schema:
            continue
        name, how = schema[number]
        if how == _REPEATED_NUMBER:
            fields.setdefault(name, []).append((wire_type, value))
            continue
        expected = _VARINT if how == _NUMBER else _LENGTH_DELIMITED
        if wire_type != expected or how == _MESSAGE and name in fields:
            raise _Unusual
        fields[name] = value
    if at != end:
        raise _Unusual
    return fields


def _shape(view, values: list) -> list[int]:
    """Shape extents, packed (one length-delimited run) or not (one varint each)."""
    extents = []
    for wire_type, value in values:
        if wire_type == _VARINT:
            extents.append(value)
            continue
        at, end = value
        while at < end:
            extent, at = _varint(view, at)
            extents.append(extent)
        if at != end:
            raise _Unusual
    return extents


def _varint(view, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise _Unusual


def _int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def _int32(value: int) -> int:
    value &= (1 << 32) - 1
    return value - (1 << 32) if value >> 31 else value
