"""BioLM-style JSON request bodies -> the same validated requests as gRPC.

A body is checked for its JSON shape here (objects, lists, strings, integers, no
unknown fields); what the values may be is decided by `esm2_service.validation`,
the rules the gRPC frontend applies, so both doors refuse the same requests with
the same field names (`items[3].sequence`, `params.repr_layers[0]`).
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from esm2_service.client.params import INCLUDE_NAMES  # BioLM's names for the outputs
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.server.errors import PayloadTooLarge
from esm2_service.validation import (
    FieldViolation,
    InvalidRequest,
    ValidRequest,
    validate_encode,
    validate_predict,
)

ACTIONS = ("encode", "predict", "log_prob")


@dataclass(frozen=True)
class HttpRequest:
    """A validated request of one action. log_prob runs as an Encode of the logits."""

    action: str
    valid: ValidRequest


def read_body(raw: bytes, content_encoding: str, limit: int) -> Any:
    """The JSON document of a request body (gzip or identity, at most `limit` bytes
    after decompression); InvalidRequest for a body that is not JSON."""
    encoding = content_encoding.strip().lower()
    if encoding == "gzip":
        raw = _gunzip(raw, limit)
    elif encoding not in ("", "identity"):
        raise _invalid("body", f"Content-Encoding {encoding!r} is not supported; use gzip")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise _invalid("body", f"not valid JSON: {error}") from None


def _gunzip(raw: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits=31)  # gzip framing
    try:
        data = inflater.decompress(raw, limit + 1)
        if len(data) > limit or inflater.unconsumed_tail:
            raise PayloadTooLarge(f"the request body inflates past {limit:,} bytes")
        if not inflater.eof:
            raise _invalid("body", "truncated gzip data")
    except (zlib.error, gzip.BadGzipFile) as error:
        raise _invalid("body", f"not valid gzip data: {error}") from None
    return data


def parse_request(action: str, document: Any) -> HttpRequest:
    """The validated request of `action`; InvalidRequest listing every violation. A body
    of the wrong shape (types, unknown fields) is refused with every shape violation
    (and unknown output names); a well-formed one is then held to the service's rules,
    every violation at once, unknown output names among them."""
    if not isinstance(document, dict):
        raise _invalid("body", f"expected a JSON object, got {_kind(document)}")
    violations = _unknown_fields(document, ("items", "params"), "")
    unknown_outputs: list[FieldViolation] = []
    items = _items(document.get("items"), violations)
    if action == "encode":
        params = _encode_params(document, violations, unknown_outputs)
        request = pb.EncodeRequest(items=items, params=params)
    elif action == "log_prob":
        _no_params(document, violations)
        # The log-probability is computed from the final layer's logits.
        request = pb.EncodeRequest(items=items, params=pb.EncodeParams(include=[pb.INCLUDE_LOGITS]))
    else:
        _no_params(document, violations)
        request = pb.PredictRequest(items=items)
    if violations:
        raise InvalidRequest(violations + unknown_outputs)
    validate = validate_predict if action == "predict" else validate_encode
    try:
        valid = validate(request)
    except InvalidRequest as error:
        raise InvalidRequest(error.violations + unknown_outputs) from None
    if unknown_outputs:
        raise InvalidRequest(unknown_outputs)
    return HttpRequest(action, valid)


def _items(value: Any, violations: list[FieldViolation]) -> list[pb.Item]:
    if value is None:
        violations.append(FieldViolation("items", "required: a list of 1 to 8 {sequence} objects"))
        return []
    if not isinstance(value, list):
        violations.append(FieldViolation("items", f"expected a list, got {_kind(value)}"))
        return []
    items = []
    for index, item in enumerate(value):
        where = f"items[{index}]"
        if not isinstance(item, dict):
            violations.append(FieldViolation(where, f"expected an object, got {_kind(item)}"))
            continue
        violations += _unknown_fields(item, ("sequence",), f"{where}.")
        sequence = item.get("sequence")
        if not isinstance(sequence, str):
            got = "nothing" if sequence is None else _kind(sequence)
            violations.append(FieldViolation(f"{where}.sequence", f"expected a string, got {got}"))
            continue
        items.append(pb.Item(sequence=sequence))
    return items


def _encode_params(
    document: dict, violations: list[FieldViolation], unknown_outputs: list[FieldViolation]
) -> pb.EncodeParams:
    """The params of an Encode body. Output names it does not know go to `unknown_outputs`,
    so they are reported beside the value violations of the rest of the request."""
    params = document.get("params", {})
    if params is None:
        return pb.EncodeParams()
    if not isinstance(params, dict):
        violations.append(FieldViolation("params", f"expected an object, got {_kind(params)}"))
        return pb.EncodeParams()
    violations += _unknown_fields(params, ("repr_layers", "include"), "params.")
    out = pb.EncodeParams()
    for index, layer in enumerate(_list(params, "repr_layers", violations)):
        if isinstance(layer, int) and not isinstance(layer, bool) and -(2**31) <= layer < 2**31:
            out.repr_layers.append(layer)
        else:
            violations.append(
                FieldViolation(
                    f"params.repr_layers[{index}]", f"expected an integer, got {layer!r}"
                )
            )
    for index, name in enumerate(_list(params, "include", violations)):
        if isinstance(name, str) and name in INCLUDE_NAMES:
            out.include.append(INCLUDE_NAMES[name])
        else:
            valid = ", ".join(INCLUDE_NAMES)
            unknown_outputs.append(
                FieldViolation(
                    f"params.include[{index}]", f"unknown output {name!r}; valid: {valid}"
                )
            )
    return out


def _list(params: dict, name: str, violations: list[FieldViolation]) -> list:
    value = params.get(name, [])
    if value is None:
        return []
    if not isinstance(value, list):
        violations.append(FieldViolation(f"params.{name}", f"expected a list, got {_kind(value)}"))
        return []
    return value


def _no_params(document: dict, violations: list[FieldViolation]) -> None:
    params = document.get("params")
    if params not in (None, {}):
        violations.append(FieldViolation("params", "this action takes no parameters"))


def _unknown_fields(document: dict, known: tuple[str, ...], prefix: str) -> list[FieldViolation]:
    return [
        FieldViolation(f"{prefix}{name}", f"unknown field; expected {', '.join(known)}")
        for name in document
        if name not in known
    ]


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")


def _invalid(field: str, description: str) -> InvalidRequest:
    return InvalidRequest([FieldViolation(field, description)])
