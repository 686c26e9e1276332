"""Request validation: pure functions from a request message to a resolved request.

Every violation in a request is collected and reported at once, each naming its
field (`items[3].sequence`, `params.repr_layers[0]`) and, for a bad character,
its position. Nothing here knows gRPC or Redis. The frontend decides with these
rules; the Python client runs the same ones over a caller's whole list before it
splits the list into requests, so every violation names the caller's own index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from esm2_service.alphabet import ACCEPTED_CHARACTERS, MASK_TOKEN, split_tokens, token_count
from esm2_service.esm2.internal.v1 import queue_pb2 as qpb
from esm2_service.esm2.v1 import esm2_pb2 as pb

MAX_ITEMS = 8
MAX_TOKENS = 2048
NUM_LAYERS = 6
# Past this many bad characters in one sequence, the rest are summarised.
MAX_CHARACTER_VIOLATIONS = 10

_INCLUDE_NAMES = {v: k for k, v in pb.Include.items() if v != pb.INCLUDE_UNSPECIFIED}
_DTYPES = frozenset(pb.Dtype.values())
_ACCEPTED_DESCRIPTION = "accepted: ACDEFGHIKLMNPQRSTVWY, XBUZO, '-'"
_RESIDUE_CLASS = "[" + re.escape("".join(sorted(ACCEPTED_CHARACTERS))) + "]"
_RESIDUES = re.compile(_RESIDUE_CLASS + "+")
_RESIDUES_AND_MASKS = re.compile(f"(?:{_RESIDUE_CLASS}|{re.escape(MASK_TOKEN)})+")


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidRequest(ValueError):
    """A request broke one or more rules; `violations` lists every one."""

    def __init__(self, violations: list[FieldViolation]):
        self.violations = violations
        shown = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
        more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
        super().__init__(f"invalid request: {shown}{more}")


@dataclass(frozen=True)
class Undecodable:
    """A request body that did not parse as the protobuf message `message_name`."""

    message_name: str
    error: str


def check_decoded(request):
    """The request itself, or InvalidRequest if its bytes did not decode."""
    if isinstance(request, Undecodable):
        description = f"not a valid {request.message_name} message: {request.error}"
        raise InvalidRequest([FieldViolation("request", description)])
    return request


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed validation, with its defaults resolved."""

    task: int  # qpb.TASK_ENCODE or qpb.TASK_PREDICT
    sequences: tuple[str, ...]
    repr_layers: tuple[int, ...] = ()  # sorted, unique, 0..6 (Encode)
    include: tuple[int, ...] = ()  # sorted, unique pb.INCLUDE_* (Encode)
    dtype: int = pb.DTYPE_FLOAT32

    @property
    def token_counts(self) -> tuple[int, ...]:
        return tuple(map(token_count, self.sequences))


def encode_violations(
    request: pb.EncodeRequest, max_items: int | None = MAX_ITEMS
) -> list[FieldViolation]:
    """Every rule `request` breaks; `max_items=None` checks a list of any length."""
    return (
        _check_items(request.items, allow_mask=False, max_items=max_items)
        + _check_layers(request.params.repr_layers)
        + _check_include(request.params.include)
        + _check_dtype(request.params.dtype)
    )


def predict_violations(
    request: pb.PredictRequest, max_items: int | None = MAX_ITEMS
) -> list[FieldViolation]:
    """Every rule `request` breaks; `max_items=None` checks a list of any length."""
    return _check_items(request.items, allow_mask=True, max_items=max_items) + _check_dtype(
        request.params.dtype
    )


def validate_encode(request: pb.EncodeRequest | Undecodable) -> ValidRequest:
    request = check_decoded(request)
    violations = encode_violations(request)
    if violations:
        raise InvalidRequest(violations)
    return ValidRequest(
        task=qpb.TASK_ENCODE,
        sequences=tuple(item.sequence for item in request.items),
        repr_layers=resolve_layers(request.params.repr_layers),
        include=tuple(sorted(set(request.params.include or [pb.INCLUDE_MEAN]))),
        dtype=request.params.dtype or pb.DTYPE_FLOAT32,
    )


def validate_predict(request: pb.PredictRequest | Undecodable) -> ValidRequest:
    request = check_decoded(request)
    violations = predict_violations(request)
    if violations:
        raise InvalidRequest(violations)
    return ValidRequest(
        task=qpb.TASK_PREDICT,
        sequences=tuple(item.sequence for item in request.items),
        dtype=request.params.dtype or pb.DTYPE_FLOAT32,
    )


def resolve_layers(layers) -> tuple[int, ...]:
    """Negative layers count from the end (-1 is 6); empty means [-1]."""
    layers = list(layers) or [-1]
    return tuple(sorted({layer % (NUM_LAYERS + 1) for layer in layers}))


def _check_items(items, *, allow_mask: bool, max_items: int | None) -> list[FieldViolation]:
    if not items:
        return [FieldViolation("items", f"no items; send 1 to {MAX_ITEMS}")]
    violations = []
    if max_items is not None and len(items) > max_items:
        violations.append(FieldViolation("items", f"{len(items)} items; the limit is {MAX_ITEMS}"))
    for index, item in enumerate(items):
        violations += check_sequence(item.sequence, f"items[{index}].sequence", allow_mask)
    return violations


def check_sequence(sequence: str, field: str, allow_mask: bool) -> list[FieldViolation]:
    """The violations of one sequence: length, characters, and masks for Predict."""
    if not sequence:
        return [FieldViolation(field, f"empty; a sequence needs 1 to {MAX_TOKENS:,} tokens")]
    if _valid_at_a_glance(sequence, allow_mask):
        return []
    tokens = split_tokens(sequence)
    violations = _character_violations(tokens, field, allow_mask)
    if len(tokens) > MAX_TOKENS:
        violations.append(
            FieldViolation(field, f"{len(tokens):,} tokens; the limit is {MAX_TOKENS:,}")
        )
    if allow_mask and MASK_TOKEN not in tokens:
        violations.append(FieldViolation(field, "no <mask>; Predict needs at least one per item"))
    return violations


def _valid_at_a_glance(sequence: str, allow_mask: bool) -> bool:
    """True for the common valid sequence, in one regular-expression pass."""
    if not allow_mask:
        return len(sequence) <= MAX_TOKENS and _RESIDUES.fullmatch(sequence) is not None
    return (
        MASK_TOKEN in sequence
        and token_count(sequence) <= MAX_TOKENS
        and _RESIDUES_AND_MASKS.fullmatch(sequence) is not None
    )


def _character_violations(tokens: list[str], field: str, allow_mask: bool) -> list[FieldViolation]:
    violations = []
    bad = 0
    position = 1  # 1-based character position in the string the caller sent
    for token in tokens:
        if token == MASK_TOKEN and not allow_mask:
            bad += 1
            if bad <= MAX_CHARACTER_VIOLATIONS:
                violations.append(
                    FieldViolation(
                        field, f"<mask> at position {position}: only Predict accepts <mask>"
                    )
                )
        elif token != MASK_TOKEN and token not in ACCEPTED_CHARACTERS:
            bad += 1
            if bad <= MAX_CHARACTER_VIOLATIONS:
                accepted = _ACCEPTED_DESCRIPTION + (", '<mask>'" if allow_mask else "")
                violations.append(
                    FieldViolation(
                        field,
                        f"character {token!r} at position {position} is not accepted ({accepted})",
                    )
                )
        position += len(token)
    if bad > MAX_CHARACTER_VIOLATIONS:
        violations.append(
            FieldViolation(field, f"{bad - MAX_CHARACTER_VIOLATIONS} more characters not accepted")
        )
    return violations


def _check_layers(layers) -> list[FieldViolation]:
    low, high = -(NUM_LAYERS + 1), NUM_LAYERS
    return [
        FieldViolation(f"params.repr_layers[{i}]", f"layer {layer} is outside {low}..{high}")
        for i, layer in enumerate(layers)
        if not low <= layer <= high
    ]


def _check_include(include) -> list[FieldViolation]:
    valid = ", ".join(_INCLUDE_NAMES.values())
    return [
        FieldViolation(f"params.include[{i}]", f"unknown output {value}; valid: {valid}")
        for i, value in enumerate(include)
        if value not in _INCLUDE_NAMES
    ]


def _check_dtype(dtype: int) -> list[FieldViolation]:
    if dtype in _DTYPES:
        return []
    return [
        FieldViolation(
            "params.dtype", f"unknown dtype {dtype}; valid: {', '.join(pb.Dtype.keys())}"
        )
    ]
