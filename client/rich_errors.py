"""Field violations of an INVALID_ARGUMENT error, without extra dependencies, and the
client's own error for invalid input in a list of any length.

The server sends a `google.rpc.Status` holding a `google.rpc.BadRequest` in the
`grpc-status-details-bin` trailer. Decoding it usually takes googleapis-common-protos;
the client needs only protobuf, so it declares the two messages itself, in a
private descriptor pool (the wire format is all that matters).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import grpc
import grpc.aio
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from esm2_service import metadata
from esm2_service.validation import FieldViolation, Violations, left_out_count

_FIELD = descriptor_pb2.FieldDescriptorProto
_DETAILS_KEY = "grpc-status-details-bin"
_ITEM_FIELD = re.compile(r"^items\[(\d+)\]")
_VARIANT_FIELD = re.compile(r"^variants\[(\d+)\]")


@functools.cache
def _messages():
    pool = descriptor_pool.DescriptorPool()
    any_file = descriptor_pb2.FileDescriptorProto()
    any_pb2.DESCRIPTOR.CopyToProto(any_file)
    pool.Add(any_file)
    rpc = descriptor_pb2.FileDescriptorProto(
        name="esm2_service/client/google_rpc.proto",
        package="google.rpc",
        dependency=["google/protobuf/any.proto"],
        syntax="proto3",
    )
    status = rpc.message_type.add(name="Status")
    status.field.add(name="code", number=1, type=_FIELD.TYPE_INT32, label=_FIELD.LABEL_OPTIONAL)
    status.field.add(name="message", number=2, type=_FIELD.TYPE_STRING, label=_FIELD.LABEL_OPTIONAL)
    status.field.add(
        name="details",
        number=3,
        type=_FIELD.TYPE_MESSAGE,
        label=_FIELD.LABEL_REPEATED,
        type_name=".google.protobuf.Any",
    )
    bad_request = rpc.message_type.add(name="BadRequest")
    violation = bad_request.nested_type.add(name="FieldViolation")
    for number, name in ((1, "field"), (2, "description")):
        violation.field.add(
            name=name, number=number, type=_FIELD.TYPE_STRING, label=_FIELD.LABEL_OPTIONAL
        )
    bad_request.field.add(
        name="field_violations",
        number=1,
        type=_FIELD.TYPE_MESSAGE,
        label=_FIELD.LABEL_REPEATED,
        type_name=".google.rpc.BadRequest.FieldViolation",
    )
    pool.Add(rpc)
    find = pool.FindMessageTypeByName
    return (
        message_factory.GetMessageClass(find("google.rpc.Status")),
        message_factory.GetMessageClass(find("google.rpc.BadRequest")),
    )


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """(field, description) of every violation the server reported, e.g.
    ("items[3].sequence", "character 'a' at position 12 is not accepted ...")."""
    if isinstance(error, InvalidArgumentError):
        return list(error.violations)
    trailers = _trailers(error)
    status_class, bad_request_class = _messages()
    found = []
    for key, value in trailers:
        if key != _DETAILS_KEY:
            continue
        try:
            for detail in status_class.FromString(value).details:
                if detail.type_url.endswith("/google.rpc.BadRequest"):
                    violations = bad_request_class.FromString(detail.value).field_violations
                    found += [(v.field, v.description) for v in violations]
        except DecodeError:
            return []
    return found


def request_id(error: grpc.RpcError) -> str | None:
    """The id the frontend gave the failed call, to quote when reporting it; None if the
    call never reached the frontend's handler (e.g. refused by authentication)."""
    if isinstance(error, InvalidArgumentError):
        return error.request_ids[0] if error.request_ids else None
    for key, value in _trailers(error):
        if key == metadata.REQUEST_ID:
            return value.decode() if isinstance(value, bytes) else value
    return None


def cancelled_unseen(error: grpc.RpcError) -> bool:
    """CANCELLED on a call the service never took (no request id), which the caller did
    not cancel: gRPC cancels the calls that reach a server as it stops, before a handler
    takes them (grpc/grpc#41785), as in a frontend's rolling restart. Safe to send again."""
    return error.code() == grpc.StatusCode.CANCELLED and request_id(error) is None


def _trailers(error: grpc.RpcError):
    return error.trailing_metadata() or () if hasattr(error, "trailing_metadata") else ()


class InvalidArgumentError(grpc.RpcError):
    """Invalid input, each violation numbered in the caller's own list of sequences.

    The clients raise it before sending anything when their copy of the service's rules
    (`esm2_service.validation`) finds a problem anywhere in the list, and in place of a
    server's INVALID_ARGUMENT for one of the requests a list was split into, with that
    request's `items[i]` shifted to the caller's index. It is a `grpc.RpcError` with
    code INVALID_ARGUMENT, like the server's.
    """

    def __init__(self, violations: Iterable[tuple[str, str]], request_ids: Iterable[str] = ()):
        self.violations = list(violations)
        self.request_ids = tuple(request_ids)
        listed = [v for v in self.violations if not left_out_count(*v)]
        rest = sum(left_out_count(*v) for v in self.violations) + len(listed[5:])
        shown = "; ".join(f"{field}: {description}" for field, description in listed[:5])
        more = f" (and {rest:,} more)" if rest else ""
        self._details = f"invalid request: {shown}{more}"
        super().__init__(self._details)

    @classmethod
    def merged(cls, errors: Iterable[InvalidArgumentError]) -> InvalidArgumentError:
        """One error with the violations of all of `errors` in `item_order`, each one they
        share once: at most as many listed as one server error lists, then one violation
        counting the rest, the ones each error left out among them."""
        errors = list(errors)
        every = [v for error in errors for v in error.violations]
        listed = dict.fromkeys(v for v in every if not left_out_count(*v))
        found = Violations(FieldViolation(*v) for v in sorted(listed, key=item_order))
        found.left_out += sum(left_out_count(*v) for v in every)
        return cls(
            ((v.field, v.description) for v in found),
            [rid for error in errors for rid in error.request_ids],
        )

    @classmethod
    def from_server(cls, error: grpc.RpcError, offset: int) -> InvalidArgumentError:
        """The server's violations for a request whose first item is the caller's `offset`."""
        violations = [(shift_item(field, offset), text) for field, text in field_violations(error)]
        if not violations:  # no BadRequest details: keep the server's message
            violations = [("request", error.details() or "invalid")]
        found = request_id(error)
        return cls(violations, () if found is None else (found,))

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return tuple((metadata.REQUEST_ID, rid) for rid in self.request_ids)


class ServiceUnreachableError(grpc.aio.AioRpcError):
    """UNAVAILABLE before any service answered: no gRPC connection could be made to
    `target`. The message names the address and what to check. An `AioRpcError`, so
    code catching `grpc.RpcError` (or, around the async client, `AioRpcError`) still
    catches it; `cause` is the details gRPC gave."""

    def __init__(self, target: str, hint: str, cause: str):
        self.target = target
        self.cause = cause
        message = f"cannot reach the service at {target}: {hint} (gRPC said: {cause})"
        super().__init__(grpc.StatusCode.UNAVAILABLE, details=message)

    def __str__(self) -> str:
        return self.details() or ""


def unreachable(error: grpc.RpcError, target: str) -> grpc.RpcError:
    """`error` as a ServiceUnreachableError if it says no connection to `target` could
    be made; any other error unchanged."""
    if not hasattr(error, "code") or error.code() != grpc.StatusCode.UNAVAILABLE:
        return error
    cause = error.details() or ""
    hint = _connection_hint(cause)
    return error if hint is None else ServiceUnreachableError(target, hint, cause)


def _connection_hint(cause: str) -> str | None:
    """What to check, for the details gRPC gives a failed connection; None for other
    UNAVAILABLE errors (a service that answered, e.g. with its queue down)."""
    if "Failed parsing HTTP/2" in cause:
        return (
            "that port speaks HTTP/1, not gRPC (likely the HTTP door, `esm2 http`); "
            "give the gRPC port (50051 by default)"
        )
    if cause.startswith(("errors resolving", "DNS resolution failed")):
        return "its host name does not resolve; check the spelling"
    if not cause.startswith("failed to connect to all addresses"):
        return None
    if "Connection refused" in cause:
        return "nothing listens there; is `esm2 serve` (or `esm2 server`) running on that port?"
    if "handshake" in cause.lower() or "ssl" in cause.lower():
        return "the TLS handshake failed; does the server use TLS, with that CA?"
    return "no connection could be made; is the service running there, reachable from here?"


def shift_item(field: str, offset: int) -> str:
    """ "items[3].sequence" of a request starting at item `offset` -> "items[3+offset]..."."""
    return _ITEM_FIELD.sub(lambda match: f"items[{int(match.group(1)) + offset}]", field)


def shift_variant(field: str, offset: int) -> str:
    """ "variants[3]" of a Score request starting at variant `offset` -> "variants[3+offset]"."""
    return _VARIANT_FIELD.sub(lambda match: f"variants[{int(match.group(1)) + offset}]", field)


def item_order(violation: tuple[str, str]) -> float:
    """Sort key (stable sorts keep each group's order): item violations first, by item,
    then the others (parameters), as the service lists one request's violations."""
    match = _ITEM_FIELD.match(violation[0])
    return int(match.group(1)) if match else float("inf")
