"""The packed-tensor codec: numpy arrays <-> `esm2.v1.Tensor` chunks.

A tensor travels as little-endian, C-order bytes with its dtype and full shape.
Large tensors are split into chunks of at most `MAX_CHUNK_BYTES`, so every
message stays under gRPC's default 4 MiB limit. bfloat16 has no numpy dtype:
it travels as the upper 16 bits of float32 (round to nearest even) and is
decoded back to float32 exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import numpy as np

from esm2_service.esm2.v1 import esm2_pb2 as pb

# Leaves room for the other fields of a response message under 4 MiB (4,194,304 bytes).
MAX_CHUNK_BYTES = 4 * 1024 * 1024 - 64 * 1024

_WIRE_NUMPY_DTYPE = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype("<u2"),
}


def element_size(dtype: int) -> int:
    try:
        return _WIRE_NUMPY_DTYPE[resolve_dtype(dtype)].itemsize
    except KeyError:
        raise ValueError(f"unknown tensor dtype {dtype}") from None


def resolve_dtype(dtype: int) -> int:
    """DTYPE_UNSPECIFIED means float32."""
    return pb.DTYPE_FLOAT32 if dtype == pb.DTYPE_UNSPECIFIED else dtype


def to_wire_bytes(array: np.ndarray, dtype: int) -> bytes:
    """Encodes a float array as `dtype` bytes (little-endian, C order)."""
    dtype = resolve_dtype(dtype)
    if dtype == pb.DTYPE_BFLOAT16:
        return float32_to_bfloat16_bits(array).tobytes()
    return np.ascontiguousarray(array, dtype=_WIRE_NUMPY_DTYPE[dtype]).tobytes()


def float32_to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(array, dtype="<f4").view("<u4").astype(np.uint64)
    rounding = ((bits >> 16) & 1) + 0x7FFF  # round to nearest, ties to even
    upper = ((bits + rounding) >> 16).astype("<u2")
    nan = np.isnan(np.asarray(array, dtype=np.float32))
    upper[nan] = 0x7FC0
    return upper


def chunk_messages(
    kind: int, layer: int, shape: tuple[int, ...], dtype: int, data: bytes, offset: int = 0
) -> Iterator[pb.TensorChunk]:
    """Splits `data` (bytes [offset, offset + len(data)) of a tensor) into TensorChunks."""
    dtype = resolve_dtype(dtype)
    view = memoryview(data)
    start = 0
    while True:
        part = view[start : start + MAX_CHUNK_BYTES]
        yield pb.TensorChunk(
            kind=kind,
            layer=layer,
            offset=offset + start,
            tensor=pb.Tensor(dtype=dtype, shape=shape, data=bytes(part)),
        )
        start += len(part)
        if start >= len(data):
            return


def serialized_chunk_responses(
    sequence_index: int,
    kind: int,
    layer: int,
    shape: tuple[int, ...],
    dtype: int,
    data: bytes,
    offset: int = 0,
) -> Iterator[tuple[int, bytes]]:
    """(offset, serialized response) for each chunk of `data`: the bytes of
    `EncodeResponse(sequence_index=..., chunk=chunk).SerializeToString()` for each of
    `chunk_messages(...)` (PredictResponse has the same fields), built around the tensor
    bytes with one copy of them, where the message would copy them twice."""
    tensor_head = _tensor_head(resolve_dtype(dtype), tuple(shape))
    chunk_head = _chunk_head(kind, layer)
    index_field = _index_field(sequence_index)
    view = memoryview(data)
    start = 0
    while True:
        part = view[start : start + MAX_CHUNK_BYTES]
        data_field = length_delimited(_TENSOR_DATA, len(part)) if len(part) else b""
        tensor_size = len(tensor_head) + len(data_field) + len(part)
        chunk_tail = _chunk_tail(offset + start)
        tensor_field = length_delimited(_CHUNK_TENSOR, tensor_size)
        chunk_size = len(chunk_head) + len(tensor_field) + tensor_size + len(chunk_tail)
        yield (
            offset + start,
            b"".join(
                (
                    index_field,
                    length_delimited(_RESPONSE_CHUNK, chunk_size),
                    chunk_head,
                    tensor_field,
                    tensor_head,
                    data_field,
                    part,
                    chunk_tail,
                )
            ),
        )
        start += len(part)
        if start >= len(data):
            return


# Field numbers of the length-delimited fields around the tensor bytes.
_TENSOR_DATA = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
_CHUNK_TENSOR = pb.TensorChunk.DESCRIPTOR.fields_by_name["tensor"].number
_RESPONSE_CHUNK = pb.EncodeResponse.DESCRIPTOR.fields_by_name["chunk"].number


# The fields around the tensor bytes repeat from item to item (a worker emits the same
# few shapes, kinds and indices): each is serialized once.
@functools.lru_cache(maxsize=4096)
def _tensor_head(dtype: int, shape: tuple[int, ...]) -> bytes:
    return pb.Tensor(dtype=dtype, shape=shape).SerializeToString()


@functools.lru_cache(maxsize=256)
def _chunk_head(kind: int, layer: int) -> bytes:
    return pb.TensorChunk(kind=kind, layer=layer).SerializeToString()


@functools.lru_cache(maxsize=256)
def _index_field(sequence_index: int) -> bytes:
    return pb.EncodeResponse(sequence_index=sequence_index).SerializeToString()


def _chunk_tail(offset: int) -> bytes:
    return pb.TensorChunk(offset=offset).SerializeToString() if offset else b""


def length_delimited(field: int, size: int) -> bytes:
    """A length-delimited field's tag and length, as protobuf writes them."""
    return _varint(field << 3 | 2) + _varint(size)


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


class TensorAssembler:
    """Rebuilds one tensor from its chunks, which may arrive in any order."""

    def __init__(self, dtype: int, shape: tuple[int, ...]):
        self.dtype = resolve_dtype(dtype)
        self.shape = tuple(shape)
        self.nbytes = math.prod(self.shape) * element_size(self.dtype)
        self._buffer: bytearray | None = None  # made at the first chunk
        self._ranges: dict[int, int] = {}  # offset -> length of every chunk received

    def add(self, chunk: pb.TensorChunk) -> None:
        tensor = chunk.tensor
        self.add_part(chunk.offset, tensor.dtype, tuple(tensor.shape), tensor.data)

    def add_part(self, offset: int, dtype: int, shape: tuple[int, ...], data) -> None:
        """Takes one chunk's fields (`data`: bytes or a memoryview)."""
        end = offset + len(data)
        if shape != self.shape or resolve_dtype(dtype) != self.dtype:
            raise ValueError("chunk disagrees with the tensor's dtype or shape")
        if offset < 0 or end > self.nbytes:
            raise ValueError(f"chunk bytes [{offset}, {end}) outside tensor of {self.nbytes}")
        if self._buffer is None and offset == 0 and end == self.nbytes:
            self._buffer = bytearray(data)  # the whole tensor in one chunk: one copy
        else:
            if self._buffer is None:
                self._buffer = bytearray(self.nbytes)
            self._buffer[offset:end] = data
        self._ranges[offset] = max(len(data), self._ranges.get(offset, 0))

    def _covered_bytes(self) -> int:
        """Bytes from offset 0 covered without a gap by the chunks received."""
        covered = 0
        for offset, length in sorted(self._ranges.items()):
            if offset > covered:
                break
            covered = max(covered, offset + length)
        return covered

    @property
    def complete(self) -> bool:
        return self._covered_bytes() == self.nbytes

    def array(self) -> np.ndarray:
        """The tensor as numpy: float32 for FLOAT32 and BFLOAT16, float16 for FLOAT16."""
        if not self.complete:
            raise ValueError(f"tensor incomplete: {self._covered_bytes()} of {self.nbytes} bytes")
        raw = np.frombuffer(self._buffer or bytearray(), dtype=_WIRE_NUMPY_DTYPE[self.dtype])
        if self.dtype == pb.DTYPE_BFLOAT16:
            raw = (raw.astype("<u4") << 16).view("<f4")
        return raw.astype(raw.dtype.newbyteorder("="), copy=False).reshape(self.shape)
