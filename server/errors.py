"""Domain errors and the one table that maps them to gRPC status codes.

Servicers raise these; `to_rpc_status` turns any exception into the status the
client sees. Anything not in the table is INTERNAL, and its traceback is logged.
"""

from __future__ import annotations

import logging
import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from esm2_service.validation import FieldViolation, InvalidRequest, Violations, left_out_violation

log = logging.getLogger(__name__)


MAX_DETAILS_BYTES = 4 * 1024


class ServiceError(Exception):
    """An error with a gRPC code of its own; the message is shown to the client."""

    code = grpc.StatusCode.INTERNAL


class QueueFull(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PayloadTooLarge(ServiceError):
    """A request body, or the response it would get, over the HTTP door's limits."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class ItemFailed(ServiceError):
    """A worker reported that one item of the request failed."""

    def __init__(self, sequence_index: int, code_name: str, message: str):
        code = getattr(grpc.StatusCode, code_name, grpc.StatusCode.INTERNAL)
        self.code = code
        super().__init__(f"items[{sequence_index}]: {message}")


def to_rpc_status(error: Exception) -> grpc.Status:
    """The status (code, message, rich details) a client sees for `error`."""
    if isinstance(error, InvalidRequest):
        listed = _fitting_in_details(error.found)
        message = str(error)
        if len(listed) < error.found.total:
            message += (
                f" [{error.found.total:,} violations; the first {len(listed)} are listed in "
                "the details]"
            )
        return _status(grpc.StatusCode.INVALID_ARGUMENT, message, _bad_request(listed, error.found))
    if isinstance(error, QueueFull):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after_s * 1000))
        return _status(error.code, str(error), error_details_pb2.RetryInfo(retry_delay=delay))
    if isinstance(error, ServiceError):
        return _status(error.code, str(error))
    log.error("unexpected error", exc_info=error)
    return _status(grpc.StatusCode.INTERNAL, "internal error; the server logged the details")


# The HTTP door's statuses for the same codes (google.rpc's own HTTP mapping).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def to_http_error(error: Exception) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, JSON body, headers) for `error`, by the table gRPC uses: the body
    names the gRPC code, and for invalid input lists the violations as the error shows
    them (HTTP has no trailer limit); a full queue adds Retry-After."""
    status = to_rpc_status(error)
    body: dict = {"detail": status.details, "code": status.code.name}
    headers = {}
    if isinstance(error, InvalidRequest):
        body["detail"] = str(error)  # without the gRPC message's note on its trailer
        body["errors"] = [{"field": v.field, "msg": v.description} for v in error.violations]
    if isinstance(error, QueueFull):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    http_status = getattr(error, "http_status", None) or HTTP_STATUS.get(status.code, 500)
    return http_status, body, headers


def _fitting_in_details(found: Violations) -> list[FieldViolation]:
    """The listed violations that fit in MAX_DETAILS_BYTES beside the count of the rest:
    they travel in a trailer, and default gRPC clients refuse trailers over 8 KiB (base64
    adds a third). Every field's first violation comes before any field's second, so
    each broken field listed is named; the order of the request is kept."""
    first_of_field = {}
    for index, violation in enumerate(found.listed):
        first_of_field.setdefault(violation.field, index)
    priority = sorted(
        range(len(found.listed)),
        key=lambda i: (i != first_of_field[found.listed[i].field], i),
    )
    chosen, size = [], _size(left_out_violation(found.total))
    for index in priority:
        size += _size(found.listed[index])
        if size > MAX_DETAILS_BYTES:
            break
        chosen.append(index)
    return [found.listed[i] for i in sorted(chosen)]


def _size(violation: FieldViolation) -> int:
    return len(violation.field.encode()) + len(violation.description.encode()) + 8


def _bad_request(listed: list[FieldViolation], found: Violations) -> error_details_pb2.BadRequest:
    """`listed`, then, if it is not all of `found`, one violation giving the count of the rest."""
    left_out = found.total - len(listed)
    shown = listed + [left_out_violation(left_out)] if left_out else listed
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in shown
        ]
    )


def _status(code: grpc.StatusCode, message: str, detail=None) -> grpc.Status:
    details = []
    if detail is not None:
        packed = any_pb2.Any()
        packed.Pack(detail)
        details.append(packed)
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return rpc_status.to_status(proto)
