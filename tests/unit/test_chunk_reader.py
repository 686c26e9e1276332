"""`chunk_reader.read_chunk` reads what protobuf reads, or declines (None)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from esm2_service.chunk_reader import read_chunk
from esm2_service.client.results import READ_IN_PLACE_BYTES, StreamAssembler
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.tensors import MAX_CHUNK_BYTES, serialized_chunk_responses, to_wire_bytes


def protobuf_view(raw: bytes) -> tuple:
    """What protobuf parses from `raw`, as read_chunk's fields."""
    message = pb.EncodeResponse.FromString(raw)
    chunk, tensor = message.chunk, message.chunk.tensor
    return (
        message.sequence_index,
        chunk.kind,
        chunk.layer,
        chunk.offset,
        tensor.dtype,
        tuple(tensor.shape),
        tensor.data,
    )


def read(raw: bytes) -> tuple | None:
    view = read_chunk(raw)
    return None if view is None else (*view[:-1], bytes(view.data))


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _number(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


WRITTEN = [
    # (sequence index, kind, layer, shape, dtype, offset)
    (0, pb.INCLUDE_MEAN, 6, (320,), pb.DTYPE_FLOAT32, 0),
    (7, pb.INCLUDE_PER_TOKEN, 3, (5, 320), pb.DTYPE_FLOAT16, 0),
    (2, pb.INCLUDE_ATTENTIONS, 6, (20, 9, 9), pb.DTYPE_BFLOAT16, 4096),
    (1, pb.INCLUDE_LOGITS, 0, (0, 33), pb.DTYPE_FLOAT32, 0),
]


@pytest.mark.parametrize("index, kind, layer, shape, dtype, offset", WRITTEN)
def test_reads_what_the_worker_writes_as_protobuf_does(index, kind, layer, shape, dtype, offset):
    data = bytes(range(256)) * (int(np.prod(shape)) * 4 // 256 + 1)
    data = data[: int(np.prod(shape)) * (4 if dtype == pb.DTYPE_FLOAT32 else 2)]
    for _, raw in serialized_chunk_responses(index, kind, layer, shape, dtype, data, offset):
        assert read(raw) == protobuf_view(raw)


def test_a_tensor_over_one_chunk_is_read_chunk_by_chunk_without_copies():
    data = bytes(MAX_CHUNK_BYTES + 1000)
    messages = list(serialized_chunk_responses(3, pb.INCLUDE_ATTENTIONS, 6, (len(data),), 1, data))
    views = [read_chunk(raw) for _, raw in messages]
    assert [view.offset for view in views] == [0, MAX_CHUNK_BYTES]
    assert [len(view.data) for view in views] == [MAX_CHUNK_BYTES, 1000]
    assert views[0].data.obj is messages[0][1]  # a view into the message


def test_reads_any_field_order_unpacked_shapes_and_negative_numbers():
    tensor = _field(3, b"\x01\x02\x03\x04") + _number(2, 2) + _number(2, 1) + _number(1, 2)
    chunk = _number(4, 8) + _field(3, tensor) + _number(2, 5) + _number(1, 4) + _number(9, 1)
    raw = _field(2, chunk) + _number(1, -1) + _field(15, b"unknown field")
    assert read(raw) == protobuf_view(raw) == (-1, 4, 5, 8, 2, (2, 1), b"\x01\x02\x03\x04")


@pytest.mark.parametrize(
    "raw",
    [
        pb.EncodeResponse(sequence_index=1, complete=pb.ItemComplete()).SerializeToString(),
        pb.EncodeResponse(sequence_index=1).SerializeToString(),  # no payload
        _field(2, _number(1, 1)) + _field(2, _number(2, 3)),  # protobuf merges the two
        _field(2, _number(1, 1)) + _field(3, b""),  # the last of a oneof wins: complete
        _field(2, _field(1, b"kind as bytes")),  # a wire type the field cannot have
        _field(2, _number(1, 1))[:-1],  # cut short
        b"\x15\x00\x00\x00\x00",  # a fixed32 field
    ],
)
def test_declines_what_it_does_not_read_plainly(raw):
    assert read_chunk(raw) is None


def test_whatever_it_reads_from_damaged_messages_protobuf_reads_the_same():
    rng = random.Random(0)
    data = to_wire_bytes(np.arange(12, dtype=np.float32), pb.DTYPE_FLOAT32)
    ((_, raw),) = serialized_chunk_responses(5, pb.INCLUDE_BOS, 2, (3, 4), 1, data, 16)
    checked = 0
    for _ in range(3000):
        damaged = bytearray(raw)
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 3)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        else:
            del damaged[rng.randrange(len(damaged)) :]
        damaged = bytes(damaged)
        view = read(damaged)
        if view is None:
            continue
        try:
            assert view == protobuf_view(damaged)
        except DecodeError:
            pytest.fail(f"read {damaged!r}, which protobuf refuses")
        checked += 1
    assert checked > 500  # much of the damage left messages readable


def test_the_assembler_takes_unusual_encodings_through_protobuf_and_returns_writable_arrays():
    values = np.arange(READ_IN_PLACE_BYTES // 4, dtype=np.float32)  # large: read in place
    data = to_wire_bytes(values, pb.DTYPE_FLOAT32)
    head = pb.TensorChunk(kind=pb.INCLUDE_MEAN, layer=6).SerializeToString()
    tensor = pb.Tensor(dtype=1, shape=values.shape, data=data)
    rest = pb.TensorChunk(tensor=tensor).SerializeToString()
    merged = _number(1, 0) + _field(2, head) + _field(2, rest)  # protobuf merges the two
    assert read_chunk(merged) is None
    complete = pb.EncodeResponse(sequence_index=0, complete=pb.ItemComplete()).SerializeToString()
    assembler = StreamAssembler(1)
    assembler.add(merged)
    assembler.add(complete)
    (item,) = assembler.finish()

    array = item.tensors[(pb.INCLUDE_MEAN, 6)]
    np.testing.assert_array_equal(array, values)
    array += 1  # the caller owns it
    np.testing.assert_array_equal(array, values + 1)
