"""Request validation: pure functions from a request message to a resolved request.

Every violation in a request is collected and reported at once, each naming its
field (`items[3].sequence`, `params.repr_layers[0]`) and, for a bad character,
its position; past MAX_REPORTED_VIOLATIONS they are only counted (`Violations`).
Nothing here knows gRPC or Redis. The frontend decides with these rules; the Python
client runs the same ones over a caller's whole list before it splits the list into
requests, so every violation names the caller's own index.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from esm2_service.alphabet import (
    ACCEPTED_CHARACTERS,
    MASK_TOKEN,
    split_tokens,
    token_count,
    uppercase_residues,
)
from esm2_service.esm2.internal.v1 import queue_pb2 as qpb
from esm2_service.esm2.v1 import esm2_pb2 as pb

MAX_ITEMS = 8
MAX_TOKENS = 2048
NUM_LAYERS = 6
# Past this many bad characters in one sequence, the rest are summarised.
MAX_CHARACTER_VIOLATIONS = 10
# An error lists at most this many violations, then one giving the count of the rest, so
# that a request with a million bad entries gets a small error for little more work.
MAX_REPORTED_VIOLATIONS = 100
# User text echoed in an error or a log line (a field name, a value) is cut to this.
MAX_ECHOED_CHARACTERS = 40

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


def clip(text: str) -> str:
    """`text`, or its first MAX_ECHOED_CHARACTERS characters and its length: a caller's
    text echoed in an error or a log line stays short however long it was."""
    if len(text) <= MAX_ECHOED_CHARACTERS:
        return text
    return f"{text[:MAX_ECHOED_CHARACTERS]}…({len(text):,} characters)"


_LEFT_OUT = re.compile(r"and ([\d,]+) more violations, not listed")


def left_out_violation(count: int) -> FieldViolation:
    """The last violation of an error that lists only some: how many it leaves out."""
    return FieldViolation("request", f"and {count:,} more violations, not listed")


def left_out_count(field: str, description: str) -> int:
    """The count a `left_out_violation` gives; 0 for any other violation."""
    match = _LEFT_OUT.fullmatch(description) if field == "request" else None
    return int(match.group(1).replace(",", "")) if match else 0


class Violations:
    """The violations of one request, at most MAX_REPORTED_VIOLATIONS of them listed and
    the rest only counted. Listed first is each broken field's first violation (as many
    fields as fit), then the earliest of the others, all in request order, so a request
    with fewer broken fields than the bound gets every one named. Iterating gives what an
    error shows: the listed ones, then, if any were left out, a `left_out_violation`."""

    def __init__(self, violations: Iterable[FieldViolation] = ()):
        self.listed: list[FieldViolation] = []
        self.left_out = 0
        self._fields: set[str] = set()  # the fields of the listed violations
        self._is_first: list[bool] = []  # for each listed one: its field's first?
        self._repeats = 0  # listed violations that are not their field's first
        self._add_all(violations)

    @property
    def total(self) -> int:
        return len(self.listed) + self.left_out

    def __bool__(self) -> bool:
        return self.total > 0

    def __iter__(self) -> Iterator[FieldViolation]:
        yield from self.listed
        if self.left_out:
            yield left_out_violation(self.left_out)

    def add(self, field: str, description: str) -> None:
        self.add_each(((field, description),), FieldViolation)

    def add_each(self, entries: Iterable[tuple], describe: Callable[..., FieldViolation]) -> None:
        """One violation per entry, `describe(*entry)`. Past the bound an entry is described
        only while it may displace a field's second violation (at most a few per listed
        one); once every listed violation is its field's first, it is only counted."""
        for entry in entries:
            if len(self.listed) < MAX_REPORTED_VIOLATIONS:
                self._list(describe(*entry))
            elif self._repeats:
                self._displace(describe(*entry))
            else:
                self.left_out += 1

    def extend(self, other: Violations) -> None:
        """`other`'s violations after these (its left-out ones counted as left out)."""
        self._add_all(other.listed)
        self.left_out += other.left_out

    def _add_all(self, violations: Iterable[FieldViolation]) -> None:
        for violation in violations:
            self.add(violation.field, violation.description)

    def _list(self, violation: FieldViolation) -> None:
        first = violation.field not in self._fields
        self._repeats += not first
        self._is_first.append(first)
        self._fields.add(violation.field)
        self.listed.append(violation)

    def _displace(self, violation: FieldViolation) -> None:
        """With the list full, the first violation of a field not yet named takes the
        place of the last one that is not its field's first."""
        self.left_out += 1
        if violation.field in self._fields:
            return
        last_repeat = max(i for i, first in enumerate(self._is_first) if not first)
        del self.listed[last_repeat], self._is_first[last_repeat]
        self._repeats -= 1
        self._list(violation)


class InvalidRequest(ValueError):
    """A request broke one or more rules; `violations` lists them as an error shows them
    (see Violations), `found` holds them as collected."""

    def __init__(self, violations: Violations | Iterable[FieldViolation]):
        self.found = violations if isinstance(violations, Violations) else Violations(violations)
        self.violations = list(self.found)
        shown = "; ".join(f"{v.field}: {v.description}" for v in self.found.listed[:5])
        rest = self.found.total - min(len(self.found.listed), 5)
        more = f" (and {rest:,} more)" if rest else ""
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


def encode_violations(request: pb.EncodeRequest, max_items: int | None = MAX_ITEMS) -> Violations:
    """Every rule `request` breaks; `max_items=None` checks a list of any length."""
    found = Violations()
    _check_items(found, request.items, allow_mask=False, max_items=max_items)
    _check_layers(found, request.params.repr_layers)
    _check_include(found, request.params.include)
    _check_dtype(found, request.params.dtype)
    return found


def predict_violations(request: pb.PredictRequest, max_items: int | None = MAX_ITEMS) -> Violations:
    """Every rule `request` breaks; `max_items=None` checks a list of any length."""
    found = Violations()
    _check_items(found, request.items, allow_mask=True, max_items=max_items)
    _check_dtype(found, request.params.dtype)
    return found


def validate_encode(request: pb.EncodeRequest | Undecodable) -> ValidRequest:
    request = check_decoded(request)
    violations = encode_violations(request)
    if violations:
        raise InvalidRequest(violations)
    return ValidRequest(
        task=qpb.TASK_ENCODE,
        sequences=_uppercased(request.items),
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
        sequences=_uppercased(request.items),
        dtype=request.params.dtype or pb.DTYPE_FLOAT32,
    )


def _uppercased(items) -> tuple[str, ...]:
    return tuple(uppercase_residues(item.sequence) for item in items)


def resolve_layers(layers) -> tuple[int, ...]:
    """Negative layers count from the end (-1 is 6); empty means [-1]."""
    layers = list(layers) or [-1]
    return tuple(sorted({layer % (NUM_LAYERS + 1) for layer in layers}))


def _check_items(found: Violations, items, *, allow_mask: bool, max_items: int | None) -> None:
    if not items:
        found.add("items", f"no items; send 1 to {MAX_ITEMS}")
        return
    if max_items is not None and len(items) > max_items:
        found.add("items", f"{len(items)} items; the limit is {MAX_ITEMS}")
    for index, item in enumerate(items):
        check_sequence(item.sequence, f"items[{index}].sequence", allow_mask, found)


def check_sequence(
    sequence: str, field: str, allow_mask: bool, found: Violations | None = None
) -> Violations:
    """The violations of one sequence (length, characters, and masks for Predict), added
    to `found` (new if None), which is returned. Residues count in either case
    (`uppercase_residues`); a bad character is quoted as the caller wrote it."""
    found = Violations() if found is None else found
    if not sequence:
        found.add(field, f"empty; a sequence needs 1 to {MAX_TOKENS:,} tokens")
        return found
    uppercase = uppercase_residues(sequence)
    if _valid_at_a_glance(uppercase, allow_mask):
        return found
    tokens = split_tokens(uppercase)
    _check_characters(found, tokens, field, allow_mask, sequence)
    if len(tokens) > MAX_TOKENS:
        found.add(field, f"{len(tokens):,} tokens; the limit is {MAX_TOKENS:,}")
    if allow_mask and MASK_TOKEN not in tokens:
        found.add(field, "no <mask>; Predict needs at least one per item")
    return found


def _valid_at_a_glance(sequence: str, allow_mask: bool) -> bool:
    """True for the common valid sequence, in one regular-expression pass."""
    if not allow_mask:
        return len(sequence) <= MAX_TOKENS and _RESIDUES.fullmatch(sequence) is not None
    return (
        MASK_TOKEN in sequence
        and token_count(sequence) <= MAX_TOKENS
        and _RESIDUES_AND_MASKS.fullmatch(sequence) is not None
    )


def _check_characters(
    found: Violations, tokens: list[str], field: str, allow_mask: bool, written: str
) -> None:
    """`tokens`: of the uppercased sequence; `written`: the sequence as sent."""
    accepted = _ACCEPTED_DESCRIPTION + (", '<mask>'" if allow_mask else "")

    def describe(position: int, token: str) -> FieldViolation:
        if token == MASK_TOKEN:
            return FieldViolation(
                field, f"<mask> at position {position}: only Predict accepts <mask>"
            )
        character = written[position - 1]
        return FieldViolation(
            field, f"character {character!r} at position {position} is not accepted ({accepted})"
        )

    bad = _bad_characters(tokens, allow_mask)
    found.add_each(itertools.islice(bad, MAX_CHARACTER_VIOLATIONS), describe)
    more = sum(1 for _ in bad)
    if more:
        found.add(field, f"{more} more characters not accepted")


def _bad_characters(tokens: list[str], allow_mask: bool) -> Iterator[tuple[int, str]]:
    """(1-based position in the string the caller sent, token) of each refused token."""
    position = 1
    for token in tokens:
        if _is_refused(token, allow_mask):
            yield position, token
        position += len(token)


def _is_refused(token: str, allow_mask: bool) -> bool:
    if token == MASK_TOKEN:
        return not allow_mask
    return token not in ACCEPTED_CHARACTERS


def _check_layers(found: Violations, layers) -> None:
    low, high = -(NUM_LAYERS + 1), NUM_LAYERS
    outside = ((i, layer) for i, layer in enumerate(layers) if not low <= layer <= high)
    found.add_each(
        outside,
        lambda i, layer: FieldViolation(
            f"params.repr_layers[{i}]", f"layer {layer} is outside {low}..{high}"
        ),
    )


def _check_include(found: Violations, include) -> None:
    valid = ", ".join(_INCLUDE_NAMES.values())
    unknown = ((i, value) for i, value in enumerate(include) if value not in _INCLUDE_NAMES)
    found.add_each(
        unknown,
        lambda i, value: FieldViolation(
            f"params.include[{i}]", f"unknown output {value}; valid: {valid}"
        ),
    )


def _check_dtype(found: Violations, dtype: int) -> None:
    if dtype not in _DTYPES:
        found.add("params.dtype", f"unknown dtype {dtype}; valid: {', '.join(pb.Dtype.keys())}")
