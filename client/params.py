"""Caller-facing parameters -> protobuf requests, and the splitting of long lists.

Include and dtype names follow BioLM's esm2-8m API ("mean", "per_token", ...).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.validation import FieldViolation, clip

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


def _unknown_name(field: str, what: str, name: object, table: dict[str, int]) -> FieldViolation:
    """The violation of a name not in `table`, worded as the HTTP door words it."""
    shown = repr(clip(name)) if isinstance(name, str) else clip(repr(name))
    return FieldViolation(field, f"unknown {what} {shown}; valid: {', '.join(table)}")


def _is_name_in(table: dict[str, int], name: object) -> bool:
    return isinstance(name, str) and name in table


def parse_dtype(name: str) -> tuple[int, tuple[FieldViolation, ...]]:
    """(wire value, ()) of dtype `name`; (DTYPE_UNSPECIFIED, (its violation,)) if unknown."""
    if _is_name_in(DTYPE_NAMES, name):
        return DTYPE_NAMES[name], ()
    return pb.DTYPE_UNSPECIFIED, (_unknown_name("params.dtype", "dtype", name, DTYPE_NAMES),)


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
    """The parameters of one `encode` call, the names already turned into wire values."""

    include: tuple[int, ...]  # pb.Include values
    layers: tuple[int, ...]  # as requested, may be negative
    dtype: int  # pb.Dtype value
    # The names no wire value stands for (left out of the fields above), as violations
    # of the request's fields, reported with the service's own checks of the rest.
    unknown_names: tuple[FieldViolation, ...] = ()

    @classmethod
    def parse(
        cls, include: Iterable[str] | str, repr_layers: Iterable[int] | int, dtype: str
    ) -> EncodeSpec:
        """Empty `include` means ("mean",), empty layers (-1,); unknown names are kept in
        `unknown_names`, the layers' range is left to the service's rules."""
        names = (include,) if isinstance(include, str) else tuple(include) or ("mean",)
        layers = (repr_layers,) if isinstance(repr_layers, int) else tuple(repr_layers)
        unknown = tuple(
            _unknown_name(f"params.include[{index}]", "output", name, INCLUDE_NAMES)
            for index, name in enumerate(names)
            if not _is_name_in(INCLUDE_NAMES, name)
        )
        wire_dtype, unknown_dtype = parse_dtype(dtype)
        return cls(
            include=tuple(
                INCLUDE_NAMES[name] for name in names if _is_name_in(INCLUDE_NAMES, name)
            ),
            layers=tuple(operator.index(layer) for layer in layers or (-1,)),
            dtype=wire_dtype,
            unknown_names=unknown + unknown_dtype,
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
