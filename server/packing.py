"""EncodePacked's and PredictPacked's messages, built from the serialized responses the
workers wrote without parsing them.

A packed message is its repeated `responses` field, so it is each response behind the
field's tag and length, back to back. The client's reader is `chunk_reader.read_packed`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.tensors import length_delimited

# gRPC's default receive limit: no message a client reads may be larger.
MAX_PACKED_BYTES = 4 * 1024 * 1024
_RESPONSES = pb.EncodePackedResponse.DESCRIPTOR.fields_by_name["responses"].number


def pack(responses: Iterable[bytes]) -> Iterator[bytes]:
    """Packed messages holding `responses` in order, as few as fit MAX_PACKED_BYTES each.
    (Every response is a chunk of at most `MAX_CHUNK_BYTES` or a completion, so each fits
    alone.)"""
    parts: list[bytes] = []
    size = 0
    for response in responses:
        head = length_delimited(_RESPONSES, len(response))
        if parts and size + len(head) + len(response) > MAX_PACKED_BYTES:
            yield b"".join(parts)
            parts, size = [], 0
        parts += (head, response)
        size += len(head) + len(response)
    if parts:
        yield b"".join(parts)
