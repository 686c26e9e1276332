"""BioLM-style JSON request bodies -> the same validated requests as gRPC.

A body is checked for its JSON shape here (objects, lists, strings, integers, no
unknown fields); what the values may be is decided by `esm2_service.validation`,
the rules the gRPC frontend applies, so both doors refuse the same requests with
the same field names (`items[3].sequence`, `params.repr_layers[0]`).
"""

from __future__ import annotations

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
    Violations,
    clip,
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


# Input given to zlib at a time: what it copies after each member's end stays this
# small, so a body of thousands of tiny members still inflates in linear time.
GZIP_PIECE_BYTES = 16 * 1024


def _gunzip(raw: bytes, limit: int) -> bytes:
    """The content of a gzip body: each of its members in turn (concatenated members
    are gzip too), at most `limit` bytes in all. Whatever follows a member must be
    another whole member: trailing bytes of any other kind are refused, not ignored."""
    data = bytearray()
    inflater, fed, members = zlib.decompressobj(wbits=31), False, 0  # gzip framing
    pending, offset = b"", 0
    try:
        while pending or offset < len(raw):
            if not pending:
                pending = raw[offset : offset + GZIP_PIECE_BYTES]
                offset += len(pending)
            data += inflater.decompress(pending, limit + 1 - len(data))
            if len(data) > limit:
                raise PayloadTooLarge(f"the request body inflates past {limit:,} bytes")
            pending, fed = b"", True
            if inflater.eof:
                members += 1
                pending = inflater.unused_data
                inflater, fed = zlib.decompressobj(wbits=31), False
    except zlib.error as error:
        raise _invalid("body", f"not valid gzip data (member {members + 1}): {error}") from None
    if fed or not members:
        raise _invalid("body", "truncated gzip data")
    return bytes(data)


def parse_request(action: str, document: Any) -> HttpRequest:
    """The validated request of `action`; InvalidRequest listing its violations. A body
    of the wrong shape (types, unknown fields) is refused with every shape violation
    (and unknown output names); a well-formed one is then held to the service's rules,
    every violation at once, unknown output names among them. As everywhere, at most
    MAX_REPORTED_VIOLATIONS are listed and the rest counted."""
    if not isinstance(document, dict):
        raise _invalid("body", f"expected a JSON object, got {_kind(document)}")
    shape, unknown_outputs = Violations(), Violations()
    _check_unknown_fields(shape, document, ("items", "params"), "")
    items = _items(document.get("items"), shape)
    if action == "encode":
        params = _encode_params(document, shape, unknown_outputs)
        request = pb.EncodeRequest(items=items, params=params)
    elif action == "log_prob":
        _no_params(document, shape)
        # The log-probability is computed from the final layer's logits.
        request = pb.EncodeRequest(items=items, params=pb.EncodeParams(include=[pb.INCLUDE_LOGITS]))
    else:
        _no_params(document, shape)
        request = pb.PredictRequest(items=items)
    if shape:
        raise InvalidRequest(_joined(shape, unknown_outputs))
    validate = validate_predict if action == "predict" else validate_encode
    try:
        valid = validate(request)
    except InvalidRequest as error:
        raise InvalidRequest(_joined(error.found, unknown_outputs)) from None
    if unknown_outputs:
        raise InvalidRequest(unknown_outputs)
    return HttpRequest(action, valid)


def _joined(first: Violations, then: Violations) -> Violations:
    joined = Violations()
    joined.extend(first)
    joined.extend(then)
    return joined


def _items(value: Any, shape: Violations) -> list[pb.Item]:
    if value is None:
        shape.add("items", "required: a list of 1 to 8 {sequence} objects")
        return []
    if not isinstance(value, list):
        shape.add("items", f"expected a list, got {_kind(value)}")
        return []
    items = []
    for index, item in enumerate(value):
        if isinstance(item, dict):
            _check_unknown_fields(shape, item, ("sequence",), f"items[{index}].")
            sequence = item.get("sequence")
            if isinstance(sequence, str):
                items.append(pb.Item(sequence=sequence))
                continue
        shape.add_each([(index, item)], _bad_item)
    return items


def _bad_item(index: int, item: Any) -> FieldViolation:
    """The violation of an item that is not an object with a string `sequence`."""
    if not isinstance(item, dict):
        return FieldViolation(f"items[{index}]", f"expected an object, got {_kind(item)}")
    sequence = item.get("sequence")
    got = "nothing" if sequence is None else _kind(sequence)
    return FieldViolation(f"items[{index}].sequence", f"expected a string, got {got}")


def _encode_params(
    document: dict, shape: Violations, unknown_outputs: Violations
) -> pb.EncodeParams:
    """The params of an Encode body. Output names it does not know go to `unknown_outputs`,
    so they are reported beside the value violations of the rest of the request."""
    params = document.get("params", {})
    if params is None:
        return pb.EncodeParams()
    if not isinstance(params, dict):
        shape.add("params", f"expected an object, got {_kind(params)}")
        return pb.EncodeParams()
    _check_unknown_fields(shape, params, ("repr_layers", "include"), "params.")
    layers = _list(params, "repr_layers", shape)
    shape.add_each(
        ((index, layer) for index, layer in enumerate(layers) if not _is_int32(layer)),
        lambda index, layer: FieldViolation(
            f"params.repr_layers[{index}]", f"expected an integer, got {_shown(layer)}"
        ),
    )
    names = _list(params, "include", shape)
    valid = ", ".join(INCLUDE_NAMES)
    unknown_outputs.add_each(
        ((index, name) for index, name in enumerate(names) if not _is_output_name(name)),
        lambda index, name: FieldViolation(
            f"params.include[{index}]", f"unknown output {_shown(name)}; valid: {valid}"
        ),
    )
    return pb.EncodeParams(
        repr_layers=[layer for layer in layers if _is_int32(layer)],
        include=[INCLUDE_NAMES[name] for name in names if _is_output_name(name)],
    )


def _is_int32(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31


def _is_output_name(value: Any) -> bool:
    return isinstance(value, str) and value in INCLUDE_NAMES


def _list(params: dict, name: str, shape: Violations) -> list:
    value = params.get(name, [])
    if value is None:
        return []
    if not isinstance(value, list):
        shape.add(f"params.{name}", f"expected a list, got {_kind(value)}")
        return []
    return value


def _no_params(document: dict, shape: Violations) -> None:
    params = document.get("params")
    if params not in (None, {}):
        shape.add("params", "this action takes no parameters")


def _check_unknown_fields(
    shape: Violations, document: dict, known: tuple[str, ...], prefix: str
) -> None:
    expected = f"unknown field; expected {', '.join(known)}"
    unknown = ((name,) for name in document if name not in known)
    shape.add_each(unknown, lambda name: FieldViolation(f"{prefix}{clip(name)}", expected))


def _shown(value: Any) -> str:
    """A JSON value as an error echoes it: its repr, cut short."""
    return repr(clip(value)) if isinstance(value, str) else clip(repr(value))


_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}


def _kind(value: Any) -> str:
    return _KINDS.get(type(value)) or ("a number" if isinstance(value, int | float) else "a value")


def _invalid(field: str, description: str) -> InvalidRequest:
    return InvalidRequest([FieldViolation(field, description)])
