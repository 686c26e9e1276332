"""EncodePacked's and PredictPacked's messages, built from the serialized responses the
workers wrote without parsing them.

A packed message is its repeated `responses` field, so it is each response behind the
field's tag and length, back to back. The client's reader is `chunk_reader.read_packed`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.tensors import length_delimited

# A message takes responses while it stays within PACK_BYTES; a larger response goes alone
# (its chunks are at most `MAX_CHUNK_BYTES`, so every message is under gRPC's default 4 MiB
# receive limit, MAX_PACKED_BYTES). Past 256 KiB gRPC's cost per message is small beside
# the bytes', and buffers of megabytes cost fresh pages: per-token outputs in messages of
# up to 4 MiB ran at 660 to 910 items/s, in messages of up to 256 KiB at 810 to 930.
PACK_BYTES = 256 * 1024
MAX_PACKED_BYTES = 4 * 1024 * 1024
_RESPONSES = pb.EncodePackedResponse.DESCRIPTOR.fields_by_name["responses"].number


def pack(responses: Iterable[bytes]) -> Iterator[bytes]:
    """Packed messages holding `responses` in order: as few as fit PACK_BYTES each, a
    larger response alone."""
    parts: list[bytes] = []
    size = 0
    for response in responses:
        head = length_delimited(_RESPONSES, len(response))
        if parts and size + len(head) + len(response) > PACK_BYTES:
            yield b"".join(parts)
            parts, size = [], 0
        parts += (head, response)
        size += len(head) + len(response)
    if parts:
        yield b"".join(parts)
