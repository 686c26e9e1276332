"""Caller-facing parameters -> protobuf requests, and the splitting of long lists.

Include and dtype names follow BioLM's esm2-8m API ("mean", "per_token", ...).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from esm2_service.esm2.v1 import esm2_pb2 as pb

from .results import CompletedItem, EncodeResult, encode_result

# The server takes 1 to 8 items per request.
MAX_ITEMS_PER_REQUEST = 8

INCLUDE_NAMES: dict[str, int] = {
    "mean": pb.INCLUDE_MEAN,
    "per_token": pb.INCLUDE_PER_TOKEN,
    "bos": pb.INCLUDE_BOS,
    "contacts": pb.INCLUDE_CONTACTS,
    "logits": pb.INCLUDE_LOGITS,
    "attentions": pb.INCLUDE_ATTENTIONS,
}
DTYPE_NAMES: dict[str, int] = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
}


def _lookup(table: dict[str, int], what: str, name: str) -> int:
    try:
        return table[name]
    except (KeyError, TypeError):
        valid = ", ".join(table)
        raise ValueError(f"unknown {what} {name!r}; valid: {valid}") from None


def include_value(name: str) -> int:
    """`"mean"` -> `pb.INCLUDE_MEAN`; ValueError naming the valid names otherwise."""
    return _lookup(INCLUDE_NAMES, "include", name)


def dtype_value(name: str) -> int:
    """`"float32"` -> `pb.DTYPE_FLOAT32`; ValueError naming the valid names otherwise."""
    return _lookup(DTYPE_NAMES, "dtype", name)


def check_sequences(sequences: Sequence[str]) -> list[str]:
    """The sequences as a list; a lone string is refused rather than split into letters."""
    if isinstance(sequences, str):
        raise TypeError("sequences must be a list of strings, not one string")
    return list(sequences)


def split_batches(sequences: list[str], batch_size: int) -> list[tuple[int, list[str]]]:
    """(offset of the first item in `sequences`, items) for each request."""
    return [
        (start, sequences[start : start + batch_size])
        for start in range(0, len(sequences), batch_size)
    ]


def check_batch_size(batch_size: int) -> int:
    """`batch_size` if it is 1 to `MAX_ITEMS_PER_REQUEST`; ValueError otherwise."""
    if not 1 <= batch_size <= MAX_ITEMS_PER_REQUEST:
        raise ValueError(f"batch_size must be 1 to {MAX_ITEMS_PER_REQUEST}, got {batch_size}")
    return batch_size


@dataclass(frozen=True)
class EncodeSpec:
    """The validated parameters of one `encode` call."""

    include: tuple[int, ...]  # pb.Include values
    layers: tuple[int, ...]  # as requested, may be negative
    dtype: int  # pb.Dtype value

    @classmethod
    def parse(
        cls, include: Iterable[str] | str, repr_layers: Iterable[int] | int, dtype: str
    ) -> EncodeSpec:
        """Checks the names and layers; empty `include` means ("mean",), empty layers (-1,)."""
        names = (include,) if isinstance(include, str) else tuple(include)
        layers = (repr_layers,) if isinstance(repr_layers, int) else tuple(repr_layers)
        return cls(
            include=tuple(include_value(name) for name in names or ("mean",)),
            layers=tuple(operator.index(layer) for layer in layers or (-1,)),
            dtype=dtype_value(dtype),
        )

    def request(self, sequences: list[str]) -> pb.EncodeRequest:
        return pb.EncodeRequest(
            items=[pb.Item(sequence=sequence) for sequence in sequences],
            params=pb.EncodeParams(repr_layers=self.layers, include=self.include, dtype=self.dtype),
        )

    def result(self, item: CompletedItem, sequence_index: int) -> EncodeResult:
        return encode_result(item, sequence_index, self.include, self.layers)


def predict_request(sequences: list[str], dtype: int) -> pb.PredictRequest:
    return pb.PredictRequest(
        items=[pb.Item(sequence=sequence) for sequence in sequences],
        params=pb.PredictParams(dtype=dtype),
    )
