"""The request rules of the issue, written again from scratch as a test oracle.

Nothing here imports the server's validation: the fuzz tests compare the service
(and its pure validators) against this independent reading of the rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from esm2_service.esm2.v1 import esm2_pb2 as pb

MASK = "<mask>"
STANDARD = "ACDEFGHIKLMNPQRSTVWY"
EXTENDED = "XBUZO"
GAP = "-"
ACCEPTED = frozenset(STANDARD + EXTENDED + GAP)
# Residues count in either case; only these 25 ASCII letters are lowercase residues.
LOWERCASE = {letter.lower(): letter for letter in STANDARD + EXTENDED}
ACCEPTED_ANY_CASE = ACCEPTED | frozenset(LOWERCASE)
MAX_ITEMS = 8
MAX_TOKENS = 2048
LAYER_RANGE = range(-7, 7)  # -7..6
VALID_INCLUDE = frozenset(range(1, 7))  # INCLUDE_MEAN..INCLUDE_ATTENTIONS
VALID_DTYPE = frozenset(range(0, 4))  # UNSPECIFIED, FLOAT32, FLOAT16, BFLOAT16
MAX_REQUEST_BYTES = 256 * 1024

# Every field a violation may name, with the index (if any) it refers to.
LEGAL_FIELD = re.compile(
    r"request|items|params\.dtype"
    r"|items\[(?P<item>0|[1-9]\d*)\]\.sequence"
    r"|params\.repr_layers\[(?P<layer>0|[1-9]\d*)\]"
    r"|params\.include\[(?P<include>0|[1-9]\d*)\]"
)


def tokens(sequence: str) -> list[str]:
    """One token per character; `<mask>` is one token."""
    out, i = [], 0
    while i < len(sequence):
        if sequence.startswith(MASK, i):
            out.append(MASK)
            i += len(MASK)
        else:
            out.append(sequence[i])
            i += 1
    return out


def uppercased(sequence: str) -> str:
    """An accepted sequence as the service passes it on: lowercase residues uppercased."""
    return "".join(LOWERCASE.get(token, token) for token in tokens(sequence))


def bad_characters(sequence: str, allow_mask: bool) -> list[tuple[int, str]]:
    """(1-based character position, token) of every token the rules refuse."""
    bad, position = [], 1
    for token in tokens(sequence):
        if (token == MASK and not allow_mask) or (token != MASK and token not in ACCEPTED_ANY_CASE):
            bad.append((position, token))
        position += len(token)
    return bad


def sequence_problems(sequence: str, allow_mask: bool) -> bool:
    """Whether the sequence breaks any rule."""
    toks = tokens(sequence)
    return (
        not 1 <= len(toks) <= MAX_TOKENS
        or bool(bad_characters(sequence, allow_mask))
        or (allow_mask and MASK not in toks)
    )


@dataclass
class Expected:
    """The fields a request's violations must name; empty for a valid request."""

    fields: set[str] = field(default_factory=set)
    # items[i].sequence -> (position, token) of its first bad character
    first_bad: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return not self.fields


def expected(method: str, request) -> Expected:
    """What the rules say about a decoded Encode or Predict request."""
    allow_mask = method == "Predict"
    out = Expected()
    if not 1 <= len(request.items) <= MAX_ITEMS:
        out.fields.add("items")
    for i, item in enumerate(request.items):
        name = f"items[{i}].sequence"
        if sequence_problems(item.sequence, allow_mask):
            out.fields.add(name)
        bad = bad_characters(item.sequence, allow_mask)
        if bad:
            out.first_bad[name] = bad[0]
    out.fields |= _param_problems(method, request.params)
    return out


def _param_problems(method: str, params) -> set[str]:
    fields = set()
    if method == "Encode":
        fields |= {
            f"params.repr_layers[{i}]"
            for i, layer in enumerate(params.repr_layers)
            if layer not in LAYER_RANGE
        }
        fields |= {
            f"params.include[{i}]"
            for i, value in enumerate(params.include)
            if value not in VALID_INCLUDE
        }
    if params.dtype not in VALID_DTYPE:
        fields.add("params.dtype")
    return fields


# The last violation of an error that lists only some: the count of those it left out.
LEFT_OUT = re.compile(r"and \d{1,3}(,\d{3})* more violations, not listed")


def is_left_out_count(field: str, description: str) -> bool:
    return field == "request" and LEFT_OUT.fullmatch(description) is not None


def field_is_legal(name: str, method: str, request=None) -> bool:
    """Whether `name` is a legal field path whose index exists in `request` (if given)."""
    match = LEGAL_FIELD.fullmatch(name)
    if match is None:
        return False
    if method == "GetStatus":
        return name == "request"
    if method == "Predict" and name.startswith(("params.repr_layers", "params.include")):
        return False
    if request is None:
        return True
    if match["item"] is not None:
        return int(match["item"]) < len(request.items)
    if match["layer"] is not None:
        return int(match["layer"]) < len(request.params.repr_layers)
    if match["include"] is not None:
        return int(match["include"]) < len(request.params.include)
    return True


def resolved_layers(layers) -> tuple[int, ...]:
    """Negative layers count from the end (-1 is 6); none means [-1]."""
    return tuple(sorted({layer + 7 if layer < 0 else layer for layer in (list(layers) or [-1])}))


REQUEST_TYPES = {
    "Encode": pb.EncodeRequest,
    "Predict": pb.PredictRequest,
    "GetStatus": pb.GetStatusRequest,
}
