"""Packed messages: `packing.pack` writes what protobuf parses, under gRPC's 4 MiB limit,
and `chunk_reader.read_packed` reads them back as protobuf does, or declines (None)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from esm2_service.chunk_reader import read_packed
from esm2_service.client.results import StreamAssembler
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.server.packing import MAX_PACKED_BYTES, PACK_BYTES, pack
from esm2_service.tensors import MAX_CHUNK_BYTES, serialized_chunk_responses, to_wire_bytes


def completion(index: int) -> bytes:
    complete = pb.ItemComplete(vocab_tokens=["A", "C"])
    return pb.EncodeResponse(sequence_index=index, complete=complete).SerializeToString()


def chunks(index: int, nbytes: int) -> list[bytes]:
    data = bytes(random.Random(index).randbytes(nbytes))
    shape = (nbytes // 4,)
    pieces = serialized_chunk_responses(index, pb.INCLUDE_MEAN, 6, shape, pb.DTYPE_FLOAT32, data)
    return [response for _, response in pieces]


def unpacked(messages: list[bytes]) -> list[bytes]:
    """The responses protobuf finds in `messages`, serialized again."""
    found = []
    for message in messages:
        packed = pb.EncodePackedResponse.FromString(message)
        found += [response.SerializeToString() for response in packed.responses]
    return found


def test_small_responses_share_one_message_in_order():
    responses = [chunks(i, 1280)[0] for i in range(8)] + [completion(i) for i in range(8)]
    messages = list(pack(responses))

    assert len(messages) == 1
    assert unpacked(messages) == responses
    assert [bytes(view) for view in read_packed(messages[0])] == responses


def test_large_responses_go_alone_and_every_message_is_under_grpcs_limit():
    # Chunks of 100 KB and 1 MiB, two of the largest a chunk can be, completions between.
    responses = [chunks(i, 100_000 if i % 2 else 1 << 20)[0] for i in range(8)]
    responses += chunks(8, 2 * MAX_CHUNK_BYTES)
    responses += [completion(i) for i in range(9)]
    messages = list(pack(responses))

    assert unpacked(messages) == responses
    assert [bytes(v) for m in messages for v in read_packed(m)] == responses
    sizes = [len(message) for message in messages]
    assert max(sizes) <= MAX_PACKED_BYTES
    # As few as fit: a message over PACK_BYTES holds one response, and no two
    # neighbours would have fit in one.
    assert all(len(read_packed(m)) == 1 for m in messages if len(m) > PACK_BYTES)
    assert all(a + b > PACK_BYTES for a, b in zip(sizes, sizes[1:], strict=False))
    assert [len(read_packed(m)) for m in messages][-1] == 9  # the completions, together
    assert list(pack([])) == []


def test_anything_but_the_plain_encoding_is_left_to_protobuf():
    response = completion(3)
    packed = next(pack([response]))
    unknown_field = packed + b"\x10\x01"  # field 2, a varint: protobuf skips it
    assert read_packed(unknown_field) is None
    assert pb.EncodePackedResponse.FromString(unknown_field).responses[0].sequence_index == 3
    assert read_packed(packed[:-1]) is None  # truncated
    assert read_packed(b"") == []


@pytest.mark.parametrize("nbytes", [1280, 700_000])
def test_the_assembler_reads_packed_streams_as_it_reads_plain_ones(nbytes):
    values = np.arange(nbytes // 4, dtype=np.float32)
    data = to_wire_bytes(values, pb.DTYPE_FLOAT32)
    responses = []
    for index in range(3):
        responses += [
            response
            for _, response in serialized_chunk_responses(
                index, pb.INCLUDE_MEAN, 6, values.shape, pb.DTYPE_FLOAT32, data
            )
        ]
        responses.append(completion(index))
    packed, plain = StreamAssembler(3), StreamAssembler(3)
    for message in pack(responses):
        packed.add_packed(message)
    for response in responses:
        plain.add(response)

    for a, b in zip(packed.finish(), plain.finish(), strict=True):
        assert a.index == b.index and a.complete == b.complete
        np.testing.assert_array_equal(a.tensors[(pb.INCLUDE_MEAN, 6)], values)
        np.testing.assert_array_equal(b.tensors[(pb.INCLUDE_MEAN, 6)], values)
